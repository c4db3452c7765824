"""``normlab bench``: how it times (balanced orders in whole cycles, rounds won, page faults, the copy in the same
rotation), the roof, the report and its targets, the command line. No timing assertions: the numbers are the bench's
output, not its tests."""
from __future__ import annotations

import json
import sys

import pytest
import torch

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


def test_bench_quick_smoke(tmp_path, capsys):
    from normlab.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    import json
    data = json.loads(out.read_text())
    assert data["results"] and "copy_gbps" in data["machine"]
    # every row's %copy is against a same-size copy timed in the same rotation as the contenders
    timed = [r for r in data["results"] if r["section"] != "lenet"]
    assert timed and all(r["copy_gbps"] and r["copy_gbps"] > 0 for r in timed)
    assert "median_frac_large_copy_on_25MB_plus" in data["summary"]
    roof = [r for r in timed if r["section"] == "roof"]
    assert roof and all(set(r["ms"]) == {"normlab", "torch", "floor"} for r in roof)
    assert data["summary"]["roof_cap_geomean_vs_torch"] > 0
    out = capsys.readouterr().out
    assert "normlab" in out and "torch %copy" in out


def test_bench_dtype_runs_every_section_in_it(tmp_path, capsys):
    """``--dtype bfloat16``: inputs, layers and LeNet as ``model.to(torch.bfloat16)``; MB counted in its bytes."""
    from normlab.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--dtype", "bfloat16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["args"]["dtype"] == "bfloat16"
    assert {r["section"] for r in data["results"]} >= {"layers", "fused_relu", "groupnorm", "lenet", "roof"}
    layer = next(r for r in data["results"] if r["section"] == "layers" and r["case"] == "16x12")
    assert layer["mbytes"] == 16 * 12 * 2 / 1e6 and layer["ms"]["normlab"] > 0
    assert "bfloat16" in capsys.readouterr().out


def test_bench_roof_bound_is_the_larger_of_memory_roof_and_autograd_floor():
    """bound = max(minimum traffic at the copy's rate, the x * 2 floor); cap = torch / bound; a floor that paid
    page faults (fresh outputs: the heap's state) is left out."""
    from normlab import bench
    big = bench.Row("roof", "a", "train_fwd_bwd", 10.0, ms={"normlab": 10.0, "torch": 16.0, "floor": 2.0},
                    copy_gbps=10.0)
    b = bench.roof_bound(big)  # 8 passes of 10 MB at 10 GB/s = 8 ms, above the 2 ms floor
    assert b["roof_ms"] == pytest.approx(8.0) and b["bound_ms"] == pytest.approx(8.0)
    assert b["cap"] == pytest.approx(2.0) and b["share"] == pytest.approx(0.8)
    assert b["torch_frac"] == pytest.approx(0.5)
    small = bench.Row("roof", "b", "train_fwd_bwd", 0.1, ms={"normlab": 0.12, "torch": 0.16, "floor": 0.08},
                      copy_gbps=10.0)
    small.ms["floor"] = 0.1
    b = bench.roof_bound(small)
    assert b["bound_ms"] == pytest.approx(0.1) and b["cap"] == pytest.approx(1.6)
    small.faults = {"floor": 25.0}
    b = bench.roof_bound(small)
    assert b["floor_ms"] is None and b["bound_ms"] == pytest.approx(0.08) and b["cap"] == pytest.approx(2.0)
    summary = bench.summarize([big, small], 10.0)
    assert summary["roof_cap_geomean_vs_torch"] == pytest.approx(2.0)
    assert summary["roof_train_fwd_bwd_geomean_vs_torch"] == pytest.approx((1.6 * 16 / 12) ** 0.5)
    assert "share" in bench.render([big, small], 10.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_bench_gpu_section_without_a_gpu_says_so():
    from normlab.cli import main
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["bench", "--quick", "--sections", "gpu"])


def test_bench_unknown_section_is_named():
    from normlab.cli import main
    with pytest.raises(SystemExit, match="unknown section.*'layer'.*choose from layers,fused"):
        main(["bench", "--quick", "--sections", "layer"])


def test_bench_copy_is_timed_in_the_contenders_rotation(monkeypatch):
    """%copy compares with a copy of the same tensor timed among the contenders, not alone in a warm cache."""
    from normlab import bench
    from normlab.bench import suite, timing
    seen = []
    real = timing.timeit_interleaved

    def spy(fns, *args, **kwargs):
        seen.append(list(fns))
        return real(fns, *args, **kwargs)
    monkeypatch.setattr(timing, "timeit_interleaved", spy)
    got, gbps = bench.timeit_with_copy({"a": lambda: None}, torch.randn(64, 64), 0.001)
    assert seen == [["a", bench.COPY]] and list(got) == ["a"] and gbps > 0
    monkeypatch.setattr(suite, "timeit_with_copy",
                        lambda fns, x, budget, log=None, rounds=None, faults=None: ({k: 1e-3 for k in fns}, 123.0))
    rows = bench.bench_layers(["8x4x6x6"], ["normlab", "torch"], 0.001, log=lambda msg: None)
    rows += bench.bench_groupnorm(True, 0.001, log=lambda msg: None)
    assert rows and all(r.copy_gbps == 123.0 for r in rows)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_bench_round_orders_balance_predecessors(n):
    """Over a cycle of rounds each contender runs right after each other one equally often (a rotated order keeps
    the same predecessor in every round but one)."""
    from collections import Counter
    from normlab.bench import round_orders
    orders = round_orders(n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    follows = Counter((a, b) for o in orders for a, b in zip(o, o[1:]))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1


def test_bench_interleaved_runs_the_balanced_orders():
    from normlab import bench
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    got = bench.timeit_interleaved(fns, budget=0.0, min_reps=5, warmup=0)
    assert set(got) == set("abcd")
    timed = calls[len(fns):]  # after one timing call each
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert rounds == [["abcd"[i] for i in o] for o in (bench.round_orders(4) * 2)[:len(rounds)]]
    assert len(rounds) == 8  # 5 requested, rounded up to whole cycles of 4
    calls.clear()
    five = {k: (lambda k=k: calls.append(k)) for k in "abcde"}
    bench.timeit_interleaved(five, budget=0.0, min_reps=5, warmup=0)
    assert len(calls) - len(five) == 10 * 5  # never part of a cycle: five contenders' design has 10 rounds


def test_bench_rounds_won_pairs_calls_within_a_round():
    """``won`` counts the rounds in which normlab's call beat the other's in the same round (not a ratio of
    medians), and leaves the copy out."""
    from normlab import bench
    rounds = {"normlab": [1.0, 3.0, 1.0, 5.0], "torch": [2.0, 2.0, 2.0, 2.0], bench.COPY: [9.0] * 4}
    assert bench.rounds_won(rounds) == {"torch": 0.5}
    assert bench.rounds_won({"torch": [1.0]}) == {}
    seen = {}
    calls = iter(range(100))
    got = bench.timeit_interleaved({"normlab": lambda: next(calls), "torch": lambda: next(calls)}, budget=0.0,
                                   min_reps=4, warmup=0, rounds=seen)
    assert set(seen) == {"normlab", "torch"} and len(seen["normlab"]) == len(seen["torch"]) == 4
    assert set(got) == {"normlab", "torch"}


@pytest.mark.skipif(sys.platform == "win32", reason="page faults come from the resource module (Unix)")
def test_bench_counts_page_faults_per_call():
    """A contender that writes freshly mapped memory on every call pays one fault per 4 KiB page, one that does
    not pays none; the table names the rows with faults (the heap state, not the kernel)."""
    import mmap
    from normlab import bench

    def fresh():
        block = mmap.mmap(-1, 64 * 4096)
        block[::4096] = b"x" * 64  # one write per page
        block.close()

    faults = {}
    bench.timeit_interleaved({"normlab": lambda: None, "torch": fresh}, budget=0.0, min_reps=6, warmup=1,
                             faults=faults)
    assert faults["normlab"] == 0 and faults["torch"] >= 64
    row = bench.Row("layers", "8x4", "train_fwd", 0.1, ms={"normlab": 1.0, "torch": 2.0}, faults=faults)
    table = bench.render([row], 10.0)
    assert "page faults per call" in table and "8x4 train_fwd: normlab 0, torch" in table
    quiet = bench.Row("layers", "8x4", "train_fwd", 0.1, ms={"normlab": 1.0, "torch": 2.0},
                      faults={"normlab": 0, "torch": 0})
    assert "page faults" not in bench.render([quiet], 10.0)
