"""The loader benchmark at a tiny size: every contestant loads the same images; the mpi4py stand-in."""

import json
import sys

from benchmarks import loader_throughput


def test_contestants_load_the_same_images_and_the_run_is_recorded(tmp_path):
    out = tmp_path / "result"
    argv = ["--images", "5", "--source-size", "40", "--size", "16", "--rounds", "2", "--min-seconds", "0.01"]
    assert loader_throughput.main([*argv, "--out", str(out), "--workdir", str(tmp_path)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]) == {"folder", "zip", "zip-png64", "prepared"}
    assert data["max_diff"] == {name: 0.0 for name in data["results"]}  # the same images, bit for bit
    for entry in data["results"].values():
        assert len(entry["wall"]) == len(entry["cpu"]) == 2 and entry["median_cpu"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| prepared |" in table and "the folder path per core" in table


def test_the_reference_module_imports_with_an_mpi4py_stand_in(tmp_path, monkeypatch):
    package = tmp_path / "improved_diffusion"
    package.mkdir()
    (package / "image_datasets.py").write_text(
        "from mpi4py import MPI\nSHARD = (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())\n"
    )
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if mpi4py were not installed
    module = loader_throughput.import_image_datasets(str(tmp_path))
    assert module.SHARD == (0, 1)
    assert sys.modules["mpi4py"] is None  # the stand-in was only there for the import
