"""`server.batch`: offline batch inference on Ray Data. The engine side (`EngineBatches`) and the
output directory are checked without Ray; the pipeline runs on a local Ray of 2 CPUs, joined by
`python -m server.batch --address` as a user's cluster would be, with a worker and then the
whole job killed mid-run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimize.samples import CALIBRATION_SENTENCES
from tests.server.ray_cluster import RAY_MISSING, descendants, joining_env, local_ray

pa = pytest.importorskip("pyarrow", reason=RAY_MISSING)
pq = pytest.importorskip("pyarrow.parquet", reason=RAY_MISSING)
pa_csv = pytest.importorskip("pyarrow.csv", reason=RAY_MISSING)

from server import batch  # noqa: E402  (after the skip: its pipeline needs pyarrow)

ROOT = Path(__file__).resolve().parents[2]
EDGE_TEXTS = ["", "Ünïcödé, 漢字 and emoji 🙂🚀", " ".join(CALIBRATION_SENTENCES[:12])]  # the last: > 64 tokens


def texts(count: int, seed: int = 0) -> list[str]:
    """Real sentences recombined (1 to 3 each), with the edge cases first."""
    rng = random.Random(seed)
    made = [" ".join(rng.sample(CALIBRATION_SENTENCES, rng.randint(1, 3))) for _ in range(count - len(EDGE_TEXTS))]
    return EDGE_TEXTS + made


def reference(engine: Any, text: str) -> np.ndarray:
    """The embedding of one text alone, as the server's text path would compute it."""
    return engine.run(engine.pipeline.tokenize([text]))["sentence_embedding"][0]


def write_jsonl(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t, "lang": "en"}) + "\n" for i, t in enumerate(rows)))
    return path


def read_output(directory: Path) -> dict[Any, np.ndarray]:
    table = pq.read_table(directory)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id was written more than once"
    return dict(zip(ids, np.array(table.column("sentence_embedding").to_pylist(), dtype=np.float32), strict=True))


# -- without Ray ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_batches(minilm_engine_dir: Path) -> batch.EngineBatches:
    return batch.EngineBatches(minilm_engine_dir)


def test_engine_batches_answer_row_for_row_what_the_engine_answers_for_each_text(engine_batches):
    rows = texts(40, seed=1)
    random.Random(2).shuffle(rows)  # mixed lengths in one batch: sorted, chunked, cut inside
    table = pa.table({"id": list(range(100, 140)), "text": rows})
    out = engine_batches(table)
    assert out.column_names == ["id", "sentence_embedding"]
    assert out.column("id").to_pylist() == list(range(100, 140))
    assert out.schema.field("sentence_embedding").type == pa.list_(pa.float32(), 384)
    got = np.array(out.column("sentence_embedding").to_pylist(), dtype=np.float32)
    want = np.stack([reference(engine_batches.engine, t) for t in rows])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_a_row_without_text_is_refused_naming_its_id(engine_batches):
    table = pa.table({"id": ["a", "b"], "text": ["fine", None]})
    with pytest.raises(batch.BatchError, match="row id='b': 'text' is None"):
        engine_batches(table)


def test_only_per_row_outputs_can_be_written(engine_batches):
    engine = engine_batches.engine
    assert [c.name for c in batch.output_columns(engine)] == ["sentence_embedding"]
    with pytest.raises(batch.BatchError, match="'last_hidden_state' has per-row shape"):
        batch.output_columns(engine, ["last_hidden_state"])
    with pytest.raises(batch.BatchError, match="no output 'logits'"):
        batch.output_columns(engine, ["logits"])


def test_an_output_directory_of_another_run_is_refused_unless_overwritten(engine_batches, tmp_path):
    identity = batch.run_identity(engine_batches.engine, engine_batches.columns, "id", "text")
    assert len(batch.prepare_output(tmp_path, identity, "id", overwrite=False)) == 0
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "part-x.parquet")
    assert batch.prepare_output(tmp_path, identity, "id", overwrite=False).to_pylist() == [1, 2]  # resumes
    other = {**identity, "text_column": "body"}
    with pytest.raises(batch.BatchError, match="holds the rows of another run \\(different text_column\\)"):
        batch.prepare_output(tmp_path, other, "id", overwrite=False)
    assert len(batch.prepare_output(tmp_path, other, "id", overwrite=True)) == 0
    assert batch.part_files(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / batch.RUN_FILE).unlink()
    with pytest.raises(batch.BatchError, match="was not written by server.batch"):
        batch.prepare_output(tmp_path, identity, "id", overwrite=False)


def test_ids_written_twice_keep_one_row(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 3], "v": [1.0, 2.0, 3.0]}), tmp_path / "part-a.parquet")
    pq.write_table(pa.table({"id": [3, 4], "v": [30.0, 4.0]}), tmp_path / "part-b.parquet")
    pq.write_table(pa.table({"id": [2], "v": [20.0]}), tmp_path / "part-c.parquet")
    assert batch.deduplicate(tmp_path, "id") == (4, 2)
    table = pq.read_table(tmp_path).sort_by("id")
    assert table.to_pydict() == {"id": [1, 2, 3, 4], "v": [1.0, 2.0, 3.0, 4.0]}
    assert [p.name for p in batch.part_files(tmp_path)] == ["part-a.parquet", "part-b.parquet"]
    assert batch.deduplicate(tmp_path, "id") == (4, 0)


def test_input_formats_are_told_from_the_file_names(tmp_path):
    (tmp_path / "a.csv").write_text("id,text\n")
    assert batch.job.format_of(tmp_path / "a.csv") == "csv"
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(batch.BatchError, match="cannot tell the format"):
        batch.job.format_of(tmp_path)


def test_actors_on_this_machine_share_its_cores_by_default(tmp_path):
    # an engine sizes its threads to every core: two actors each doing so would fight over them
    def threads(*flags: str) -> int:
        return batch.cli.threads_per_actor(batch.parse_args(["e", "--input", "i", "--output", "o", *flags]))

    assert threads("--num-cpus", "8") == 8 and threads("--num-cpus", "8", "--actors", "2") == 4
    assert threads("--num-cpus", "2", "--actors", "3") == 1
    assert threads("--address", "auto", "--cpus-per-actor", "4") == 4, "on a cluster: the CPUs it reserves"
    assert threads("--actors", "2", "--threads-per-actor", "3") == 3


# -- on Ray ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_address() -> Any:
    pytest.importorskip("ray.data", reason=RAY_MISSING)
    with local_ray(num_cpus=2) as address:
        yield address


@pytest.mark.slow
def test_embed_dataset_reads_parquet_and_csv_and_keeps_every_id(ray_address, minilm_engine_dir, engine_batches,
                                                                 tmp_path):
    rows = texts(24, seed=3)
    pq.write_table(pa.table({"id": list(range(24)), "text": rows, "extra": [0.5] * 24}), tmp_path / "in.parquet")
    (tmp_path / "csv").mkdir()
    for part in range(2):  # a directory of files, as a data lake holds them
        table = pa.table({"id": list(range(part * 12, part * 12 + 12)), "text": rows[part * 12:part * 12 + 12]})
        pa_csv.write_csv(table, tmp_path / "csv" / f"part{part}.csv")
    for source in (tmp_path / "in.parquet", tmp_path / "csv"):
        ds = batch.embed_dataset(batch.read_input(source), minilm_engine_dir, actors=1, batch_size=10)
        table = pa.Table.from_pylist(ds.take_all()).sort_by("id")
        assert table.column("id").to_pylist() == list(range(24)), source
        got = np.array(table.column("sentence_embedding").to_pylist(), dtype=np.float32)
        want = np.stack([reference(engine_batches.engine, t) for t in rows])
        np.testing.assert_allclose(got, want, atol=2e-5)


def start_batch(ray_address: str, engine_dir: Path, source: Path, output: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "server.batch", str(engine_dir), "--input", str(source), "--output", str(output),
               "--address", ray_address, "--batch-size", "16", *extra]
    return subprocess.Popen(command, cwd=ROOT, env=joining_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_parts(output: Path, process: subprocess.Popen, at_least: int = 1, timeout_s: float = 240) -> int:
    """Wait until `output` holds `at_least` part files (the job is under way); their count."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = len(batch.part_files(output)) if output.is_dir() else 0
        if count >= at_least:
            return count
        assert process.poll() is None, f"the job ended before writing anything:\n{process.stdout.read()}"
        time.sleep(0.05)
    raise AssertionError("the job wrote nothing in time")


def finish(process: subprocess.Popen, timeout_s: float = 300) -> str:
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-4000:]
    return out


def engine_workers() -> dict[int, str]:
    return {pid: cmd for pid, cmd in descendants().items() if "MapBatches(EngineBatches)" in cmd}


@pytest.mark.slow
def test_every_id_gets_one_row_though_a_worker_is_killed_mid_run(ray_address, minilm_engine_dir, engine_batches,
                                                                 tmp_path):
    rows = texts(600, seed=4)
    source, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    job = start_batch(ray_address, minilm_engine_dir, source, output, "--actors", "2", "--cpus-per-actor", "0.5")
    before = wait_for_parts(output, job)
    deadline = time.monotonic() + 20
    while not (workers := engine_workers()) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # an actor's process title can lag its first output on a loaded machine
    assert workers, "no engine actor found among this cluster's processes"
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    log = finish(job)
    assert "600 row(s), one per id" in log, log[-3000:]
    assert len(batch.part_files(output)) > before, "the job had finished before the worker was killed"
    got = read_output(output)
    assert sorted(got) == sorted(f"doc-{i}" for i in range(600))
    for i in random.Random(5).sample(range(600), 12):
        np.testing.assert_allclose(got[f"doc-{i}"], reference(engine_batches.engine, rows[i]), atol=2e-5)


@pytest.mark.slow
def test_a_job_killed_mid_run_resumes_and_writes_each_id_once(ray_address, minilm_engine_dir, tmp_path):
    rows = texts(600, seed=6)
    source, output = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out"
    job = start_batch(ray_address, minilm_engine_dir, source, output, "--actors", "1")
    wait_for_parts(output, job, at_least=2)
    job.kill()  # the driver dies: Ray ends the job and its actors, a write may be left half done
    job.wait(timeout=60)
    first = {pid for pid in pq.read_table(output, columns=["id"]).column("id").to_pylist()}
    assert 0 < len(first) < 600
    log = finish(start_batch(ray_address, minilm_engine_dir, source, output, "--actors", "1"))
    assert f"({len(first)} from an earlier run)" in log, log[-3000:]
    assert sorted(read_output(output)) == sorted(f"doc-{i}" for i in range(600))
    assert not list(output.glob(".*.tmp")), "a half-written file was left behind"


def test_a_missing_column_is_named_before_anything_runs(ray_address, minilm_engine_dir, tmp_path):
    ds = batch.read_input(write_jsonl(tmp_path / "in.jsonl", ["a", "b"]))
    with pytest.raises(batch.BatchError, match="the input has no column 'body'; it has id, text, lang"):
        batch.embed_dataset(ds, minilm_engine_dir, text_column="body")
