"""The distributed benchmark (ring against gather, and open_clip where installed) runs end to
end on 2 gloo ranks and writes its JSON, Markdown and PNG report."""

from __future__ import annotations

import json

from mgccl_ops.bench import cli
from mgccl_ops.bench import distributed as bench


def test_a_small_run_writes_every_provider_and_its_ratios(tmp_path):
    argv = ["distributed", "--worlds", "2", "--batches", "64", "130", "--dim", "8", "--repeats", "2"]
    args = cli.build_parser().parse_args([*argv, "--out", str(tmp_path)])
    rows = bench.run(args)
    written = json.loads((tmp_path / "distributed.json").read_text())
    assert len(written) == len(rows) == 2 * len(bench.providers())
    assert {(row["provider"], row["params"]["n"]) for row in written} == {
        (f"{provider} (world 2)", n) for provider in bench.providers() for n in (64, 130)
    }
    for row in written:
        assert row["params"]["n_local"] == row["params"]["n"] // 2
        assert len(row["peak_mem_mib_per_rank"]) == 2 and row["time_ms"]["runs"] == 2
        assert row["time_ms"]["median"] > 0
        if row["provider"].startswith("ring"):
            assert row["gather_time_over_ring"] > 0
    markdown = (tmp_path / "distributed.md").read_text()
    assert "| ring (world 2) | 130 | 65 |" in markdown
    assert (tmp_path / "distributed.png").is_file()
