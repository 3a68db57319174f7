"""A recipe's data from files, mapped to the model's arguments; bad data refused before
training with the file and column named; minibatches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest

from tests.helpers import REPO, setup, train
from workbench.data.sources import gather
from workbench.errors import UsageError

FLIPS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


def params_after(tmp_path: Path, *sets: str) -> dict:
    return train(setup("train.steps=30", *sets), tmp_path)["params"]


def write(tmp_path: Path, name: str, flips=FLIPS, column: str = "flips") -> Path:
    path = tmp_path / name
    if path.suffix == ".csv":
        path.write_text(f"other,{column}\n" + "".join(f"7,{f}\n" for f in flips))
    elif path.suffix == ".json":
        path.write_text(json.dumps({column: flips, "J": 3}))
    elif path.suffix == ".npy":
        numpy.save(path, numpy.array(flips, dtype=numpy.int64))
    else:
        numpy.savez(path, **{column: numpy.array(flips, dtype=numpy.float32), "other": [1, 2]})
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".npy", ".npz"])
def test_flips_from_any_file_kind_train_exactly_as_inline(tmp_path: Path, suffix: str):
    inline = params_after(tmp_path)
    name = "flips" + suffix
    path = write(tmp_path, name)
    from_file = params_after(tmp_path, "data=null", f"data.file={path}")
    assert from_file == inline


def test_coin_csv_recipe_reads_its_file_relative_to_the_recipe(tmp_path: Path):
    run = setup("train.steps=5", source=REPO / "recipes" / "coin_csv.yaml")
    assert run.data["flips"].tolist() == FLIPS
    assert run.recipe["data"]["file"] == str(REPO / "recipes" / "data" / "coin.csv")


def test_columns_stack_into_a_matrix(tmp_path: Path):
    path = tmp_path / "xy.csv"
    path.write_text("a,b,target\n1,4,0\n2,5,1\n3,6,0\n")
    data = gather({"file": str(path), "columns": {"x": ["a", "b"], "y": "target"}},
                  {"x": True, "y": True})
    assert {key: numpy.asarray(value).tolist() for key, value in data.values.items()} == {
        "x": [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]], "y": [0.0, 1.0, 0.0]}
    assert data.origin["x"] == "xy.csv column 'a', 'b'"


@pytest.mark.parametrize("content, sets, expected", [
    ("flip\n1\n0\n", [], "flips.csv: no column 'flips' for the model's argument 'flips'; "
                         "did you mean 'flip'?"),
    ("flips\n1\nx\n", [], "flips.csv line 3 column 'flips': 'x' is not a number"),
    ("flips\n1\nnan\n0\n", [], "flips.csv column 'flips': nan at index [1]"),
    ("flips\n1\n2\n0\n", [], "flips.csv column 'flips': 2.0 at index [1] is outside the support "
                             "of the Bernoulli likelihood"),
    ("flips,other\n1\n", [], "flips.csv line 2: 1 values for 2 columns"),
    ("", [], "flips.csv: empty"),
    ("flips\n", [], "flips.csv: has a header but no rows"),
    ("flips\n1\n", ["data.columns.flipz=flips"], "data.columns.flipz: the model takes no "
                                                 "argument 'flipz'; did you mean 'flips'?"),
    ("flips\n1\n", ["data.flips=[1]"], None),  # inline wins over the file
])
def test_bad_data_files_name_file_and_column(tmp_path: Path, content, sets, expected):
    path = tmp_path / "flips.csv"
    path.write_text(content)
    sets = ["data=null", f"data.file={path}", *sets]
    if expected is None:
        assert setup(*sets).data["flips"].tolist() == [1.0]
        return
    with pytest.raises(UsageError) as caught:
        setup(*sets)
    assert str(caught.value).startswith(expected), str(caught.value)


@pytest.mark.parametrize("sets, expected", [
    (["data.file=nope.csv"], "data.file: no such file nope.csv"),
    (["data.file=coin.yaml"], "data.file: coin.yaml: a data file is one of .csv, .json, .npy"),
    (["data.columns={flips: flip}"], "data.columns: names columns of a file or data set"),
    (["data.file=data/coin.csv", "data.dataset=x"], "data: give either a file or a dataset"),
])
def test_bad_data_sections_are_recipe_problems(sets: list[str], expected: str):
    with pytest.raises(UsageError) as caught:
        setup(*sets)
    assert expected in str(caught.value), str(caught.value)


def test_minibatches_subsample_the_data_plate_with_its_scale(tmp_path: Path):
    import pyro.poutine as poutine

    run = setup("data.flips=" + str([1, 0] * 500), "train.batch_size=10")
    run.minibatch.resample()
    trace = poutine.trace(run.svi.model).get_trace(**run.data)
    assert trace.nodes["flips"]["value"].shape == (10,)
    assert trace.nodes["obs"]["scale"] == pytest.approx(100.0)
    assert trace.nodes["obs"]["value"].shape == (10,)


@pytest.mark.parametrize("sets, expected", [
    (["train.batch_size=10"], "train.batch_size: 10 is not smaller than plate 'flips' (10)"),
    (["train.batch_size=5", "train.subsample_plate=flip"],
     "train.subsample_plate: name the model's plate to subsample (its plates: flips)"),
    (["train.batch_size=0"], "train.batch_size: expected a whole number >= 1"),
])
def test_bad_minibatch_settings(sets: list[str], expected: str):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        setup(*sets)


def test_minibatches_with_local_latents_and_an_autoguide(tmp_path: Path):
    """The autoguide's own plate is subsampled with the model's (its prototype saw all of it)."""
    run = setup("data=null", "data.dataset=synthetic_schools", "data.dataset.schools=1000",
                "model=eight_schools", "guide=auto_normal", "optimizer.lr=0.1",
                "train.batch_size=100", "train.steps=400", "train.eval_every=0",
                "train.plots=false", "loggers=[]",  # unread here; the fit is the same
                source=REPO / "recipes" / "eight_schools.yaml")
    summary = run.train(tmp_path)
    assert abs(summary["posterior"]["mu"]["mean"] - 5.0) < 0.3
    assert abs(summary["posterior"]["tau"]["mean"] - 2.0) < 0.3
