"""``normlab bench-plot``: what it reads from ``normlab bench --json`` runs, the figure, and its errors."""
import json

import pytest

from normlab.bench import plot as bench_plot

PNG = b"\x89PNG\r\n\x1a\n"


def _run(threads, ratios, date="2026-12-02 10:00:00 UTC"):
    """A run as ``normlab bench --json`` writes it, ``ratios`` {(section, case, mode): torch ms / normlab ms}."""
    results = [{"section": s, "case": c, "mode": m, "mbytes": 1.0, "ms": {"normlab": 1.0, "torch": r}}
               for (s, c, m), r in ratios.items()]
    # the roof: torch 9 ms against a bound of 2 ms, the larger of 8 passes of 1 MB at 4 GB/s and the 0.5 ms floor
    results.append({"section": "roof", "case": "256x512", "mode": "train_fwd_bwd", "mbytes": 1.0, "copy_gbps": 4.0,
                    "ms": {"normlab": 3.0, "torch": 9.0, "floor": 0.5}})
    # left out: a contender that failed (torch not timed)
    results.append({"section": "layers", "case": "failed", "mode": "train_fwd", "mbytes": 1.0,
                    "ms": {"normlab": 1.0}})
    return {"machine": {"torch_threads": threads, "cpu": "test cpu", "torch": "2.x", "date": date},
            "summary": {}, "results": results}


def _runs():
    one = {("layers", "256x512", "train_fwd_bwd"): 2.0, ("layers", "256x512", "eval_fwd"): 1.5,
           ("layers", "32x64x56x56", "train_fwd_bwd"): 3.0, ("groupnorm", "ln 64x256", "train_fwd"): 1.1,
           ("lenet", "LeNet-BN step", "train_step"): 1.2}
    return [_run(1, one),
            _run(1, {**one, ("layers", "256x512", "train_fwd_bwd"): 4.0}, date="2026-12-02 11:00:00 UTC"),
            _run(1, {**one, ("layers", "256x512", "train_fwd_bwd"): 1.0}),
            _run(2, {("layers", "256x512", "train_fwd_bwd"): 0.9, ("fused_relu", "256x512", "eval_fwd"): 2.7})]


def test_collect_groups_ratios_by_thread_count_section_case_and_mode():
    got = bench_plot.collect(_runs())
    assert sorted(got) == [1, 2]
    assert got[1]["layers"][("256x512", "train_fwd_bwd")] == [2.0, 4.0, 1.0]
    assert got[1]["layers"][("32x64x56x56", "train_fwd_bwd")] == [3.0] * 3
    assert got[1]["lenet"][("LeNet-BN step", "train_step")] == [1.2] * 3
    assert got[1]["roof"] == {("256x512", "train_fwd_bwd"): [3.0] * 3, ("256x512", "cap"): [4.5] * 3}
    assert set(got[1]) == {"layers", "groupnorm", "lenet", "roof"}
    assert ("failed", "train_fwd") not in got[1]["layers"]
    assert got[2]["layers"] == {("256x512", "train_fwd_bwd"): [0.9]}
    assert got[2]["fused_relu"] == {("256x512", "eval_fwd"): [2.7]}
    assert "groupnorm" not in got[2]


def test_plot_draws_every_thread_count_and_section(tmp_path, monkeypatch):
    drawn = []
    real = bench_plot._panel

    def spy(ax, section, ratios):
        drawn.append(section)
        real(ax, section, ratios)
        if section in ("layers", "roof"):
            # bars at the medians over runs; the roof's cap as a tick over its bar
            drawn.append(sorted(round(p.get_height(), 6) for p in ax.patches))
        if section == "roof":
            ticks = [seg for coll in ax.collections for seg in coll.get_segments()]
            drawn.append([(round(a[0], 2), b[0], a[1]) for a, b in ticks])
    monkeypatch.setattr(bench_plot, "_panel", spy)
    out = bench_plot.plot(_runs(), tmp_path / "bench.png")
    assert out == str(tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG
    assert drawn[:2] == ["layers", [1.5, 2.0, 3.0]]  # median of 2, 4, 1 is 2
    roof = ["roof", [3.0], [(-0.45, 0.45, 4.5)]]
    assert drawn[2:] == [*roof, "groupnorm", "lenet", "layers", [0.9], *roof, "fused_relu"]


def test_bench_plot_command_reads_json_files(tmp_path, capsys):
    from normlab.cli import main
    paths = []
    for i, run in enumerate(_runs()):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "runs.png"
    assert main(["bench-plot", *map(str, paths), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and str(out) in capsys.readouterr().out


def test_bench_plot_names_a_bad_file_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r"no file '.*missing.json'.*normlab bench --json"):
        bench_plot.load_runs([tmp_path / "missing.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="'.*bad.json' is not JSON"):
        bench_plot.load_runs([bad])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(SystemExit, match="'.*other.json' is not a `normlab bench --json` file"):
        bench_plot.load_runs([other])
    with pytest.raises(SystemExit, match="no result with both normlab and torch timed"):
        bench_plot.plot([{"machine": {}, "results": []}], tmp_path / "empty.png")


def test_bench_plot_option_draws_the_run_just_measured(tmp_path, capsys):
    from normlab.cli import main
    from normlab.kernels import cpu
    out = tmp_path / "quick.png"
    run = tmp_path / "quick.json"
    assert main(["bench", "--quick", "--sections", "layers", "--shapes", "8x4", "--plot", str(out),
                 "--json", str(run)]) == 0
    assert out.read_bytes()[:8] == PNG
    # the header and the JSON name the L2 a core has, which decides the NCHW kernels
    assert json.loads(run.read_text())["machine"]["l2_bytes"] == cpu.L2_BYTES
    assert (f"L2 {cpu.L2_BYTES >> 10} KB a core, " in capsys.readouterr().out) == bool(cpu.L2_BYTES)


def test_bench_checks_where_it_will_write_before_measuring(tmp_path, monkeypatch):
    from normlab.bench import cli
    from normlab.cli import main
    monkeypatch.setattr(cli, "bench_layers", lambda *a, **k: pytest.fail("measured before checking the paths"))
    with pytest.raises(SystemExit, match=r"--json '.*nowhere/run.json': its folder does not exist"):
        main(["bench", "--quick", "--sections", "layers", "--json", str(tmp_path / "nowhere" / "run.json")])
    with pytest.raises(SystemExit, match=r"--plot '.*nowhere/run.png': its folder does not exist"):
        main(["bench", "--quick", "--sections", "layers", "--plot", str(tmp_path / "nowhere" / "run.png")])
    with pytest.raises(SystemExit, match=r"cannot write a figure as '.*run.figure'.*\.png"):
        main(["bench", "--quick", "--sections", "layers", "--plot", str(tmp_path / "run.figure")])
    with pytest.raises(SystemExit, match=r"cannot write a figure as 'runs.txt'"):
        main(["bench-plot", str(tmp_path / "any.json"), "-o", "runs.txt"])
