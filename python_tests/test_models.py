"""The small models and the word tokenizer."""

import torch

from mgccl_ops.models import SmallDualEncoder, WordTokenizer, build_model


def test_word_tokenizer_pads_truncates_and_marks_unknown_words():
    tok = WordTokenizer(["red", "circle", "a red star"], context_length=4)
    assert tok.words == ["a", "circle", "red", "star"] and tok.vocab_size == 6
    ids = tok(["A red, CIRCLE!", "red zebra star circle red"])
    assert ids.tolist() == [[2, 4, 3, 0], [4, 1, 5, 3]]
    again = WordTokenizer.from_state_dict(tok.state_dict())
    assert torch.equal(again(["red star"]), tok(["red star"]))


def test_small_dual_encoder_shapes_and_unit_norm():
    torch.manual_seed(0)
    model = SmallDualEncoder(["red", "blue", "circle"], dim=16)
    images = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    dense, glob, grid = model.encode_image(images)
    assert grid == (8, 10) and dense.shape == (2, 80, 16) and glob.shape == (2, 16)
    text = model.encode_text(["red circle", "blue", "unknown words only"])
    assert text.shape == (3, 16)
    for t in (dense, glob, text):
        assert torch.allclose(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5)
    rebuilt = build_model(model.describe())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.encode_text(["red circle"]), model.encode_text(["red circle"]))


def test_bag_of_words_text_encoder_ignores_padding():
    model = SmallDualEncoder(["red", "circle"], dim=8, context_length=6)
    short, long, swapped = model.encode_text(["red circle", "red circle circle red", "circle red"])
    assert torch.allclose(short, long, atol=1e-6) and torch.allclose(short, swapped, atol=1e-6)
    assert not torch.allclose(short, model.encode_text(["red"])[0], atol=1e-3)


def test_text_encoder_is_linear_in_the_words():
    model = SmallDualEncoder(["red", "star"], dim=8)
    encoder, tok = model.text_encoder, model.tokenizer
    red, star = (encoder.proj(encoder.embed(tok([w])[0, :1]))[0] for w in ("red", "star"))
    expect = torch.nn.functional.normalize(red + star, dim=0)
    assert torch.allclose(model.encode_text(["red star"])[0], expect, atol=1e-6)


def test_activation_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    plain = SmallDualEncoder(["red"], dim=16).train()
    checkpointed = SmallDualEncoder(["red"], dim=16, checkpoint_activations=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    grads = []
    for model in (plain, checkpointed):
        dense, glob, _ = model.encode_image(images)
        (dense.square().mean() + glob[:, 0].sum()).backward()
        grads.append([p.grad for p in model.image_encoder.parameters()])
        assert build_model(model.describe()).image_encoder.checkpoint_activations == (model is checkpointed)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
