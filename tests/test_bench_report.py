"""``normlab bench``'s report: the issue's targets checked against a run's summary."""
from __future__ import annotations

import json

import pytest

from normlab.bench import report


def _summary(**over):
    s = {"train_fwd_bwd_geomean_vs_torch": 2.05, "train_fwd_bwd_worst_vs_torch": (0.99, "128x256x14x14cl"),
         "eval_geomean_vs_torch": 1.5, "fused_relu_fwd_bwd_geomean_vs_torch": 3.1,
         "median_frac_copy_on_25MB_plus": 0.69, "train_fwd_bwd_geomean_vs_compile": 2.4, "lenet_step_vs_torch": None,
         "groupnorm_worst_vs_torch": 1.02, "gpu_eval_geomean_vs_torch": None}
    s.update(over)
    return s


def test_targets_met_and_missed_at_their_goals():
    got = {t["key"]: t for t in report.targets(_summary())}
    assert "lenet_step_vs_torch" not in got  # not measured in this run: left out, not called missed
    assert got["train_fwd_bwd_geomean_vs_torch"]["met"]
    assert got["eval_geomean_vs_torch"]["met"]  # the goal itself meets it
    worst = got["train_fwd_bwd_worst_vs_torch"]
    assert not worst["met"] and worst["value"] == 0.99 and worst["case"] == "128x256x14x14cl"
    assert not got["median_frac_copy_on_25MB_plus"]["met"]
    assert [t["key"] for t in report.targets(_summary())] == [k for k, _, _ in report.TARGETS
                                                              if k != "lenet_step_vs_torch"]


def test_render_targets_names_value_case_and_goal():
    text = report.render_targets(report.targets(_summary()))
    lines = text.splitlines()
    assert lines[0].startswith("targets")
    worst = next(line for line in lines if "no shape slower" in line)
    assert worst.split()[0] == "MISSED" and "0.99x  (>= 1x) [128x256x14x14cl]" in worst
    copy = next(line for line in lines if "copy's bandwidth" in line)
    assert "69%" in copy and "(>= 70%)" in copy and copy.split()[0] == "MISSED"
    assert next(line for line in lines if "torch.compile" in line).split()[0] == "met"
    assert report.render_targets([]) == ""


def test_targets_over_runs_judge_the_median_run():
    runs = [_summary(train_fwd_bwd_geomean_vs_torch=v, train_fwd_bwd_worst_vs_torch=(w, case))
            for v, w, case in ((1.8, 0.56, "a"), (2.1, 1.1, "b"), (2.05, 1.2, "b"))]
    got = {t["key"]: t for t in report.targets_over_runs(runs)}
    geo = got["train_fwd_bwd_geomean_vs_torch"]
    assert geo["value"] == 2.05 and (geo["lo"], geo["hi"], geo["runs"]) == (1.8, 2.1, 3) and geo["met"]
    worst = got["train_fwd_bwd_worst_vs_torch"]
    assert worst["met"] and worst["value"] == 1.1 and worst["case"] == "a, b"  # one disturbed run does not decide
    text = report.render_targets(report.targets_over_runs(runs))
    assert text.startswith("targets (CPU, float32): the median of 3 runs")
    assert "2.05x (1.80x-2.10x)" in text


def test_bench_repeat_writes_one_json_per_run(tmp_path, capsys):
    from normlab.cli import main
    assert main(["bench", "--quick", "--sections", "layers", "--shapes", "8x4", "--repeat", "2",
                 "--json", str(tmp_path / "run.json")]) == 0
    runs = [json.loads((tmp_path / f"run_{i}.json").read_text()) for i in (1, 2)]
    assert all(r["results"] and r["summary"]["train_fwd_bwd_geomean_vs_torch"] for r in runs)
    assert not (tmp_path / "run.json").exists()
    assert capsys.readouterr().out.count("summary:") == 2
    with pytest.raises(SystemExit, match="--repeat 0: the number of runs must be 1 or more"):
        main(["bench", "--quick", "--repeat", "0"])
