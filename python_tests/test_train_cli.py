"""``mgccl train`` / ``mgccl export``: each failure of issue 13's list, with its new behaviour."""

import json
import re
import shlex
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mgccl_ops.reference as reference_ops
from mgccl_ops.cli import build_parser, main
from mgccl_ops.train import checkpoint
from mgccl_ops.train.config import TrainConfig
from mgccl_ops.train.objective import ObjectiveConfig, mgccl_loss

FAST = ["--steps", "1", "--batch-size", "2", "--backend", "reference", "--no-progress", "--num-samples", "8"]
README = Path(__file__).resolve().parents[1] / "README.md"


def _train(out, *extra):
    return main(["train", "--out-dir", str(out), *FAST, *extra])


def _pairs(folder: Path) -> Path:
    folder.mkdir()
    for i, caption in enumerate(["a dog on grass", "two cats", "a cat and a dog", "grass"]):
        Image.new("RGB", (40, 30), (40 * i, 90, 20)).save(folder / f"{i}.jpg")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def test_every_config_field_is_an_option_and_a_config_file_fills_the_rest(tmp_path):
    parser = build_parser()
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    for f in [*fields(TrainConfig), *fields(ObjectiveConfig)]:
        if f.name != "objective":
            assert "--" + f.name.replace("_", "-") in train_help, f.name
    config = tmp_path / "run.json"
    out = tmp_path / "run"
    options = {"lr": 0.01, "warmup": 3, "out_dir": str(out), "objective": {"part_tau": 0.3, "refine_iters": 2}}
    config.write_text(json.dumps(options))
    argv = ["train", *FAST, "--config", str(config), "--warmup", "5", "--no-deterministic", "--pixel-bound", "0.4"]
    assert main(argv) == 0  # the folder named by the file
    saved = checkpoint.load(out / "checkpoint.pt")["config"]
    assert saved["lr"] == 0.01 and saved["warmup"] == 5 and saved["deterministic"] is False  # command line wins
    assert saved["objective"]["part_tau"] == 0.3 and saved["objective"]["refine_iters"] == 2
    assert saved["objective"]["pixel_bound"] == 0.4 and saved["num_samples"] == 8
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 1\nbogus = 2\n")
    with pytest.raises(SystemExit, match=r"unknown training option\(s\) \['bogus'\]"):
        main(["train", "--out-dir", str(tmp_path / "other"), "--config", str(toml)])


def test_zero_hard_negatives_means_the_full_softmax():
    torch.manual_seed(0)
    b, p, d = 3, 6, 8
    dense = F.normalize(torch.randn(b, p, d), dim=-1)
    phrases = F.normalize(torch.randn(4, d), dim=-1)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0]])
    args = (dense, F.normalize(torch.randn(b, d), dim=-1), F.normalize(torch.randn(b, d), dim=-1), phrases, ids)
    cfg = ObjectiveConfig(hard_negatives=0, object_weight=0.0, pixel_weight=0.0, part_weight=1.0)
    _, parts = mgccl_loss(reference_ops, *args, torch.tensor(2.0), cfg)
    # Written out: each entity pools its image by attention and is scored against every entity of the batch.
    valid = ids >= 0
    slots = phrases[ids.clamp(min=0)]
    pooled = torch.softmax(slots @ dense.transpose(1, 2) / cfg.part_tau, -1) @ dense
    queries, bank = F.normalize(pooled, dim=-1)[valid], slots[valid]
    expect = F.cross_entropy(torch.tensor(2.0).exp() * queries @ bank.T, torch.arange(len(bank)))
    assert parts["part"] > 0.1 and torch.allclose(parts["part"], expect, atol=1e-5)  # was exactly 0
    with pytest.raises(ValueError, match="hard_negatives must be an int >= 0"):
        ObjectiveConfig(hard_negatives=-1)


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert _train(out) == 0
    with pytest.raises(SystemExit, match="already holds a run .*--resume.*--overwrite"):
        _train(out)
    assert _train(out, "--overwrite", "--seed", "3") == 0
    assert checkpoint.load(out / "checkpoint.pt")["config"]["seed"] == 3
    with pytest.raises(SystemExit, match="exclude each other"):
        _train(out, "--overwrite", "--resume")


def test_resume_restores_the_data_and_refuses_conflicting_options(tmp_path, capsys):
    data, out = _pairs(tmp_path / "pairs"), tmp_path / "run"
    assert _train(out, "--data", f"folder:{data}", "--image-size", "32") == 0
    capsys.readouterr()
    assert main(["train", "--out-dir", str(out), "--steps", "2", "--resume", "--no-progress"]) == 0
    assert "streaming pairs from" in capsys.readouterr().out  # was: continued on the built-in data
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["step"] == 2 and saved["config"]["data"] == f"folder:{data}" and saved["config"]["image_size"] == 32
    with pytest.raises(SystemExit) as refused:
        main(["train", "--out-dir", str(out), "--steps", "3", "--resume", "--data", "synthetic", "--lr", "0.5"])
    assert f"--data synthetic (saved: folder:{data})" in str(refused.value) and "--lr 0.5 (saved: 0.002)" in str(
        refused.value
    )
    assert main(["train", "--out-dir", str(out), "--steps", "3", "--resume", "--lr", "0.002", "--no-progress"]) == 0
    with pytest.raises(SystemExit, match=r"--resume: no run to resume in .*absent \(.*checkpoint.pt not found\)"):
        main(["train", "--out-dir", str(tmp_path / "absent"), "--resume"])


def _one_line_error(argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_path_and_checkpoint_errors_are_one_line_messages_naming_the_path(tmp_path):
    missing = tmp_path / "none.pt"
    assert _one_line_error(["eval", str(missing)]) == f"mgccl eval: checkpoint not found: {missing}"
    absent = tmp_path / "absent"
    message = _one_line_error(["train", "--data", f"folder:{absent}", "--out-dir", str(tmp_path / "r")])
    assert message == f"mgccl train: image-caption folder not found: {absent}"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert f"checkpoint {broken} could not be read" in _one_line_error(["eval", str(broken)])
    concepts = tmp_path / "words.txt"
    data = _pairs(tmp_path / "pairs")
    message = _one_line_error(["train", "--data", f"folder:{data}", "--concepts", str(concepts),
                               "--out-dir", str(tmp_path / "r2")])  # fmt: skip
    assert message == f"mgccl train: concepts file not found: {concepts}"
    assert str(tmp_path / "nope.json") in _one_line_error(["train", "--config", str(tmp_path / "nope.json")])


def test_checkpoints_load_with_weights_only(tmp_path):
    out = tmp_path / "run"
    assert _train(out) == 0
    torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and data, RNG states included
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_spec": {"kind": "small"}, "hook": types.SimpleNamespace(x=1)}, evil)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(evil))} could not be read"):
        checkpoint.load(evil)


def test_readme_commands_parse_as_pasted():
    text = README.read_text()
    commands = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for ln in block.splitlines()]
    commands = [c for c in commands if c.startswith("mgccl ") and not c.startswith("mgccl bench")]
    assert len(commands) >= 5
    for command in commands:
        words = shlex.split(command)
        # What bash makes of the line as pasted (brace expansion included) must be the same words.
        shell = subprocess.run(["bash", "-c", f"printf '%s\\n' {command[len('mgccl ') :]}"], capture_output=True,
                               text=True, check=True).stdout.splitlines()  # fmt: skip
        assert shell == words[1:], command
        build_parser().parse_args(words[1:])


open_clip = pytest.importorskip("open_clip", reason="open_clip is the optional 'openclip' extra")

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_arch(tmp_path):
    config = tmp_path / "mgccl-tiny-train.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    return "mgccl-tiny-train"


def test_open_clip_training_takes_the_image_size_and_weights_and_exports(tmp_path, tiny_arch):
    torch.manual_seed(1)
    start = open_clip.create_model(tiny_arch)
    weights = tmp_path / "start.pt"
    torch.save(start.state_dict(), weights)
    out = tmp_path / "run"
    # was: --image-size 96 by default, a crash deep in open_clip for a 224 (here 32) model
    assert _train(out, "--model", f"open_clip:{tiny_arch}", "--pretrained", str(weights), "--lr", "0") == 0
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["config"]["image_size"] == 32 and saved["config"]["pretrained"] == str(weights)
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1]
    state = {k.removeprefix("model."): v for k, v in saved["model"].items()}
    assert all(torch.equal(state[k], v) for k, v in start.state_dict().items())  # lr 0: the --pretrained weights
    exported = tmp_path / "exported.pt"
    assert main(["export", str(out / "checkpoint.pt"), "--out", str(exported)]) == 0
    loaded = open_clip.create_model(tiny_arch, pretrained=str(exported))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    small = tmp_path / "small"
    assert _train(small) == 0
    with pytest.raises(SystemExit, match="holds the 'small' model"):
        main(["export", str(small / "checkpoint.pt")])
    with pytest.raises(SystemExit, match="--pretrained file not found"):
        _train(tmp_path / "r3", "--model", f"open_clip:{tiny_arch}", "--pretrained", str(tmp_path / "no.pt"))


def test_tensorboard_scalars_beside_the_json_lines_only_when_importable(tmp_path, monkeypatch):
    out = tmp_path / "plain"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    assert _train(out, "--steps", "2", "--log-every", "1") == 0
    assert not (out / "tensorboard").exists() and len((out / "log.jsonl").read_text().splitlines()) == 2
    written = []

    class Writer:
        def __init__(self, folder):
            written.append(("folder", folder))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert _train(tmp_path / "board", "--steps", "2", "--log-every", "1") == 0
    assert written[0] == ("folder", str(tmp_path / "board" / "tensorboard")) and written[-1] == ("closed", None)
    assert ("loss", 1) in written and ("loss", 2) in written and ("lr", 2) in written
    assert _train(tmp_path / "off", "--steps", "1", "--no-tensorboard") == 0
    assert sum(k == "folder" for k, _ in written) == 1
