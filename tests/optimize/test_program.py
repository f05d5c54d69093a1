"""`program.pt2`: what a kiln archive holds, and that loading one never runs what it carries.

The malicious archives are made the way an attacker would: a program saved by
`torch.export.save` whose weight pickles as a call (torch writes such weights with pickle and
`torch.export.load` unpickles them with `weights_only=False`), or a kiln archive edited by hand.
Each payload writes a marker file; each test first proves that plain `torch.export.load` runs it,
then that kiln refuses the archive in one line naming the entry and the marker stays absent.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import optimize
from optimize.runtime.errors import EngineError, SourceError
from optimize.runtime.program import PROGRAM_FILE, load_program
from optimize.sources import load_source


@pytest.fixture(scope="module")
def clean_engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("program") / "eager"
    optimize.compile("tests.optimize.factories:tiny_tokens", out,
                     optimize.CompileConfig(backend="eager", max_batch=4, max_seq=16))
    return out


class _Payload(torch.Tensor):
    """A weight that pickles as a call to `exec`: what an attacker ships in place of a tensor."""

    code = ""

    def __reduce_ex__(self, protocol: object) -> tuple:
        return (exec, (self.code,))


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def _engine_with(clean: Path, target: Path, archive: bytes) -> Path:
    shutil.copytree(clean, target)
    (target / PROGRAM_FILE).write_bytes(archive)
    return target


def _edited(clean: Path, edit: Callable[[dict[str, bytes], str], None]) -> bytes:
    """The clean engine's archive with its entries (name -> bytes) changed by `edit(entries, root)`."""
    with zipfile.ZipFile(clean / PROGRAM_FILE) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    edit(entries, next(iter(entries)).split("/", 1)[0])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def _runs_under_plain_torch(archive: bytes, marker: Path) -> bool:
    """Whether `torch.export.load` of `archive` writes `marker` (it may fail afterwards)."""
    try:
        torch.export.load(io.BytesIO(archive)).module()
    except Exception:  # the payload ran before whatever torch then disliked
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def _assert_refused(engine_dir: Path, marker: Path, entry: str) -> str:
    with pytest.raises(EngineError) as info:
        optimize.load(engine_dir)
    message = str(info.value)
    assert "\n" not in message and str(engine_dir / PROGRAM_FILE) in message and entry in message, message
    assert not marker.exists(), "loading the engine ran the archive's payload"
    return message


def test_a_kiln_archive_holds_only_a_graph_json_configs_and_empty_placeholders(clean_engine: Path):
    with zipfile.ZipFile(clean_engine / PROGRAM_FILE) as archive:
        sizes = {name.split("/", 1)[1]: archive.getinfo(name).file_size for name in archive.namelist()}
        configs = [json.loads(archive.read(n)) for n in archive.namelist() if n.endswith("_config.json")]
    assert set(sizes) == {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
                          "models/model.json", "data/weights/model_weights_config.json",
                          "data/constants/model_constants_config.json", "data/sample_inputs/model.pt",
                          *(n for n in sizes if n.startswith("data/weights/weight_"))}
    assert sizes["data/sample_inputs/model.pt"] == 0, "no pickled example inputs"
    assert all(size == 0 for name, size in sizes.items() if name.startswith("data/weights/weight_"))
    assert all(meta["use_pickle"] is False for config in configs for meta in config["config"].values())
    assert isinstance(load_program(clean_engine), torch.export.ExportedProgram)


def test_weights_pickled_by_torch_export_save_are_refused_before_they_run(clean_engine: Path, tmp_path: Path):
    marker = tmp_path / "marker"
    program = load_program(clean_engine)
    name = next(iter(program.state_dict))
    _Payload.code = _marker_code(marker)
    program.state_dict[name] = torch.nn.Parameter(program.state_dict[name].as_subclass(_Payload), requires_grad=False)
    program._example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(program, buffer)  # torch pickles a tensor subclass weight, calling its __reduce_ex__
    archive = buffer.getvalue()
    assert _runs_under_plain_torch(archive, marker), "the crafted archive must be live"
    engine_dir = _engine_with(clean_engine, tmp_path / "engine", archive)
    message = _assert_refused(engine_dir, marker, "data/weights/model_weights_config.json")
    assert f"marks weight {name!r} as pickled" in message


def _pickle_entry(marker: Path) -> bytes:
    payload = _Payload()
    _Payload.code = _marker_code(marker)
    return pickle.dumps(payload)


def _pickled_constant(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def edit(entries: dict[str, bytes], root: str) -> None:
        entries[f"{root}/data/constants/model_constants_config.json"] = json.dumps({"config": {"evil": {
            "path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode()
        entries[f"{root}/data/constants/tensor_0"] = _pickle_entry(marker)
    return edit


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def edit(entries: dict[str, bytes], root: str) -> None:
        entries[f"{root}/data/constants/model_constants_config.json"] = json.dumps({"config": {"evil": {
            "path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}).encode()
        entries[f"{root}/data/constants/opaque_obj_0"] = _pickle_entry(marker)
    return edit


def _sample_inputs(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def edit(entries: dict[str, bytes], root: str) -> None:
        entries[f"{root}/data/sample_inputs/model.pt"] = _pickle_entry(marker)  # loaded weights_only, then not
    return edit


def _shape_expression(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def edit(entries: dict[str, bytes], root: str) -> None:
        graph = entries[f"{root}/models/model.json"].decode()
        symbol = json.dumps("Symbol('s")[1:-1]  # the first symbolic size of the graph, as JSON writes it
        start = graph.index(symbol)
        end = graph.index(")", start) + 1
        evil = f"__import__('builtins').exec({_marker_code(marker)!r}) or {graph[start:end]}"
        entries[f"{root}/models/model.json"] = (graph[:start] + json.dumps(evil)[1:-1] + graph[end:]).encode()
    return edit


def _guard(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def edit(entries: dict[str, bytes], root: str) -> None:
        graph = json.loads(entries[f"{root}/models/model.json"])
        # single quotes only: torch pastes the guard into a "..." literal of the code it execs
        graph["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch() is None"]
        entries[f"{root}/models/model.json"] = json.dumps(graph).encode()
        entries[f"{root}/data/sample_inputs/model.pt"] = _example_inputs()  # torch execs guards only with them
    return edit


def _example_inputs() -> bytes:
    buffer = io.BytesIO()
    torch.save(((), {"ids": torch.zeros(2, 8, dtype=torch.long)}), buffer)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # plain torch reading the crafted example inputs
@pytest.mark.parametrize(("attack", "entry", "plain_torch_runs_it"), [
    (_pickled_constant, "data/constants/model_constants_config.json", True),
    (_opaque_constant, "data/constants/model_constants_config.json", True),
    (_sample_inputs, "data/sample_inputs/model.pt", True),
    (_shape_expression, "models/model.json", True),
    (_guard, "models/model.json", False),  # exec'd when the module is called, see below
])
def test_edited_archives_that_would_run_code_are_refused(clean_engine: Path, tmp_path: Path, attack, entry: str,
                                                         plain_torch_runs_it: bool):
    marker = tmp_path / "marker"
    archive = _edited(clean_engine, attack(marker))
    if plain_torch_runs_it:
        assert _runs_under_plain_torch(archive, marker), "the crafted archive must be live"
    _assert_refused(_engine_with(clean_engine, tmp_path / "engine", archive), marker, entry)


def test_guards_code_is_python_that_torch_execs_when_the_module_runs(clean_engine: Path, tmp_path: Path):
    marker = tmp_path / "marker"
    module = torch.export.load(io.BytesIO(_edited(clean_engine, _guard(marker)))).module()
    module(ids=torch.zeros(2, 8, dtype=torch.long))
    assert marker.exists(), "the guard attack must be live, or its refusal proves nothing"


@pytest.mark.parametrize("extra", ["data/weights/model.pt", "extra/payload.pkl", "data/aotinductor/model/model.so"])
def test_entries_kiln_never_writes_are_refused(clean_engine: Path, tmp_path: Path, extra: str):
    archive = _edited(clean_engine, lambda entries, root: entries.__setitem__(f"{root}/{extra}", b"\x80\x04N."))
    _assert_refused(_engine_with(clean_engine, tmp_path / "engine", archive), tmp_path / "marker", extra)


def test_a_pt2_source_loads_without_its_pickled_example_inputs_and_refuses_pickled_weights(tmp_path: Path):
    from tests.optimize.factories import TinyMLP

    model = TinyMLP()
    program = torch.export.export(model, (torch.randn(2, 16),))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, str(path))
    with zipfile.ZipFile(path) as archive:
        assert any(n.endswith("sample_inputs/model.pt") and archive.getinfo(n).file_size for n in archive.namelist())
    source = load_source(path, optimize.CompileConfig())
    x = torch.randn(2, 16)
    torch.testing.assert_close(source.module(**{source.inputs[0].name: x})["output"], model(x))

    marker = tmp_path / "marker"
    _Payload.code = _marker_code(marker)
    program.state_dict["fc1.weight"] = torch.nn.Parameter(program.state_dict["fc1.weight"].as_subclass(_Payload),
                                                          requires_grad=False)
    torch.export.save(program, str(path))
    with pytest.raises(SourceError, match=r"mlp.pt2: entry \S+weights_config.json marks weight 'fc1.weight' as pickled"):
        load_source(path, optimize.CompileConfig())
    assert not marker.exists()
