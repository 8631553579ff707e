"""Result tables and metric plots over sweeps' results.csv (growmem table / growmem plot --results)."""

import csv

import pytest

from growmem.cli import main as cli_main
from growmem.train.plot import plot_metric
from growmem.train.tables import mean_by, parse_filters, pivot_markdown, read_results, select


def _write(path, rows):
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def two_sweeps(tmp_path):
    a = _write(tmp_path / "a.csv", [
        {"run": "1", "model.mixer": "gdn", "task.options.num_kv_pairs": 4, "model.d_model": 64, "accuracy": 0.5,
         "params": 100},
        {"run": "2", "model.mixer": "gdn", "task.options.num_kv_pairs": 16, "model.d_model": 64, "accuracy": 0.1,
         "params": 100},
        {"run": "3", "model.mixer": "attn", "task.options.num_kv_pairs": 4, "model.d_model": 64, "accuracy": 1.0,
         "params": 90},
    ])
    b = _write(tmp_path / "b.csv", [  # another sweep: other columns, a seed axis, a second width
        {"run": "4", "model.mixer": "gdn", "model.d_model": 128, "task.options.num_kv_pairs": 4, "train.seed": 0,
         "accuracy": 0.7, "params": 300},
        {"run": "5", "model.mixer": "gdn", "model.d_model": 128, "task.options.num_kv_pairs": 4, "train.seed": 1,
         "accuracy": 0.9, "params": 300},
    ])
    return a, b


def test_pivot_averages_duplicates_and_sorts_numeric_columns(two_sweeps):
    rows = read_results(list(two_sweeps))
    assert len(rows) == 5
    md = pivot_markdown(select(rows, {"model.d_model": "64"}), "model.mixer", "task.options.num_kv_pairs",
                        "accuracy", extra=["params"])
    lines = md.strip().splitlines()
    assert lines[0] == "| mixer | params | num_kv_pairs=4 | num_kv_pairs=16 |"  # 4 before 16 (numeric sort)
    assert lines[2] == "| gdn | 100 | 0.500 | 0.100 |"
    assert lines[3] == "| attn | 90 | 1.000 |  |"  # a missing cell stays empty
    md = pivot_markdown(select(rows, {"task.options.num_kv_pairs": "4.0"}), "model.d_model", "model.mixer",
                        "accuracy", digits=2)
    assert "| 128 |  | 0.80 (0.70-0.90, n=2) |" in md  # two seeds: mean (min-max); no attn at 128
    assert mean_by(rows, ("model.mixer", "model.d_model"), "accuracy")[("gdn", "128")] == pytest.approx(0.8)


def test_bad_tables_are_refused(two_sweeps, tmp_path):
    rows = read_results(two_sweeps[0])
    with pytest.raises(ValueError, match="column 'nope'"):
        pivot_markdown(rows, "nope", "model.mixer", "accuracy")
    with pytest.raises(ValueError, match="filter column"):
        select(rows, {"nope": "1"})
    with pytest.raises(ValueError, match="column=value"):
        parse_filters(["nope"])
    with pytest.raises(ValueError, match="does not exist"):
        read_results(tmp_path / "missing.csv")


def test_plot_and_table_commands(two_sweeps, tmp_path, capsys):
    a, b = map(str, two_sweeps)
    out = plot_metric([a, b], "model.d_model", "accuracy", "model.mixer", tmp_path / "w.png",
                      filters={"task.options.num_kv_pairs": "4"})
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert cli_main(["table", "--results", a, b, "--rows", "model.mixer", "--cols", "model.d_model",
                     "--filter", "task.options.num_kv_pairs=4"]) == 0
    assert "| gdn | 100-300 | 0.500 | 0.800 (0.700-0.900, n=2) |" in capsys.readouterr().out
    assert cli_main(["plot", "--results", a, "--filter", "model.mixer=gdn", "--out", str(tmp_path / "k.png")]) == 0
    bars = plot_metric([a, b], "model.mixer", ["nope", "accuracy"], "model.d_model", tmp_path / "bars.png")
    assert bars.read_bytes()[:4] == b"\x89PNG"  # categorical x: grouped bars; first metric a run has
    with pytest.raises(ValueError, match="none of the columns"):
        plot_metric(a, "model.mixer", ["nope"], "model.d_model", tmp_path / "x.png")
    assert cli_main(["table", "--results", a, "--filter", "model.mixer=none"]) == 2
    assert "match" in capsys.readouterr().err


def test_a_cell_takes_the_first_metric_its_run_reports(tmp_path):
    p = _write(tmp_path / "t.csv", [
        {"variant.model": "rmt", "variant.task": "copy", "accuracy": "", "token_accuracy": 0.25},
        {"variant.model": "rmt", "variant.task": "mqar", "accuracy": 0.5, "token_accuracy": ""},
    ])
    md = pivot_markdown(read_results(p), "variant.model", "variant.task", ["accuracy", "token_accuracy"])
    assert "| rmt | 0.250 | 0.500 |" in md
    with pytest.raises(ValueError, match="not in the results"):
        pivot_markdown(read_results(p), "variant.model", "variant.task", ["nope", "nada"])
