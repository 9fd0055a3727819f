"""Safe checkpoint loading: mmengine Runner checkpoints load without trust, pickles that would
run code are refused (and do not run), mismatches leave the model untouched."""

from __future__ import annotations

import builtins
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

from taskal.checkpoints import (
    SAFE_GLOBAL_NAMES,
    _global_name,
    load_checkpoint,
    load_weights,
    save_weights,
)

TRUST_HINT = (
    "pass trusted=True (CLI: --trust-checkpoint) only for a file you trust, "
    "since full unpickling can run arbitrary code"
)


class Toy(BaseModel):
    """A linear regressor with a buffer, trained by mmengine's Runner."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(
        self, inputs: torch.Tensor, targets: torch.Tensor | None = None, mode: str = "tensor"
    ) -> Any:
        out = self.fc(inputs)
        if mode == "loss":
            assert targets is not None
            self.steps += 1
            return {"loss": ((out - targets) ** 2).mean()}
        return out


class ToyData(torch.utils.data.Dataset):
    metainfo: ClassVar[dict[str, Any]] = {"classes": ("a", "b")}

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"inputs": torch.randn(3, generator=g), "targets": torch.randn(2, generator=g)}


class RunnerCheckpoint(NamedTuple):
    path: Path
    state_dict: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def runner_ckpt(tmp_path_factory: pytest.TempPathFactory) -> RunnerCheckpoint:
    """A checkpoint written by mmengine's CheckpointHook after two training iterations."""
    work_dir = tmp_path_factory.mktemp("runner")
    runner = Runner(
        model=Toy(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=ToyData(),
            sampler=dict(type="DefaultSampler", shuffle=False),
            batch_size=4,
            num_workers=0,
            collate_fn=dict(type="default_collate"),
        ),
        train_cfg=dict(by_epoch=False, max_iters=2, val_interval=100),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        param_scheduler=dict(type="LinearLR", start_factor=0.5, by_epoch=False, begin=0, end=2),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1, by_epoch=False)),
        default_scope="mmengine",
        log_level="ERROR",
    )
    runner.train()
    state = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    assert int(state["steps"]) == 2
    return RunnerCheckpoint(work_dir / "iter_2.pth", state)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        bits_a, bits_b = (t.contiguous().reshape(-1).view(torch.uint8) for t in (a[key], b[key]))
        assert torch.equal(bits_a, bits_b), key


def _one_line_error(excinfo: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- mmengine Runner checkpoints ------------------------------------------------------------


def test_runner_checkpoint_needs_exactly_the_allow_list(runner_ckpt: RunnerCheckpoint) -> None:
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(runner_ckpt.path))
    assert needed == {
        "builtins.getattr",
        "mmengine.logging.history_buffer.HistoryBuffer",
        "numpy._core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.dtype",
        "numpy.ndarray",
    }
    assert needed <= set(SAFE_GLOBAL_NAMES)
    # Without the allow-list torch refuses it: this is why the module exists.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_ckpt.path, weights_only=True)


def test_runner_checkpoint_loads_without_trust(runner_ckpt: RunnerCheckpoint) -> None:
    methods_before = dict(HistoryBuffer._statistics_methods)
    safe_before = torch.serialization.get_safe_globals()
    ckpt = load_checkpoint(runner_ckpt.path)
    assert set(ckpt) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    assert ckpt["meta"]["iter"] == 2
    assert ckpt["meta"]["dataset_meta"] == {"classes": ("a", "b")}
    _assert_bit_identical(dict(ckpt["state_dict"]), runner_ckpt.state_dict)
    loss = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert type(loss) is HistoryBuffer
    assert loss.data[0].dtype == np.float64 and loss.data[0].shape == (2,)
    assert loss.mean() == pytest.approx(loss.data[0].mean())
    assert isinstance(ckpt["message_hub"]["runtime_info"]["eta"], np.float64)
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert HistoryBuffer._statistics_methods == methods_before
    # The allow-list is scoped to the call, not left behind in torch (torch itself may add
    # its own entries meanwhile, e.g. when a lazily imported module registers them).
    left = [g for g in torch.serialization.get_safe_globals() if g not in safe_before]
    assert not {_global_name(g) for g in left} & set(SAFE_GLOBAL_NAMES)


def test_load_weights_restores_runner_model_bit_exactly(runner_ckpt: RunnerCheckpoint) -> None:
    model = Toy()
    with pytest.raises(AssertionError):
        _assert_bit_identical(_params(model), runner_ckpt.state_dict)
    ckpt = load_weights(model, runner_ckpt.path)
    _assert_bit_identical(_params(model), runner_ckpt.state_dict)
    assert ckpt["meta"]["iter"] == 2 and "message_hub" in ckpt


# --- pickles that would run code ------------------------------------------------------------


class Payload:
    """Unpickles to ``func(*args)``."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def _write_marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


@pytest.mark.parametrize(
    ("make_payload", "refused"),
    [
        (lambda m: Payload(os.system, f"touch {m}"), f"{os.system.__module__}.system"),
        (lambda m: Payload(builtins.exec, _write_marker_code(m)), "builtins.exec"),
        (lambda m: Payload(builtins.eval, _write_marker_code(m)), "builtins.eval"),
    ],
    ids=["os.system", "exec", "eval"],
)
def test_malicious_pickle_is_refused_and_does_not_run(
    tmp_path: Path, make_payload: Any, refused: str
) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": make_payload(marker)}, path)
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint(path)
    assert _one_line_error(excinfo) == (
        f"checkpoint {path} needs global {refused}, which is not on the allow-list of safe "
        f"types; {TRUST_HINT}"
    )
    assert not marker.exists()
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_weights(nn.Linear(2, 1), path)
    assert not marker.exists()


def test_malicious_pickle_runs_when_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = Payload(builtins.exec, _write_marker_code(marker))
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": payload}, path)
    ckpt = load_checkpoint(path, trusted=True)
    assert marker.read_text() == "ran"
    assert ckpt["meta"] is None
    assert torch.equal(ckpt["state_dict"]["w"], torch.ones(2))


def test_getattr_stand_in_answers_only_history_buffer_methods(tmp_path: Path) -> None:
    path = tmp_path / "getattr.pth"
    torch.save({"state_dict": {}, "f": Payload(getattr, HistoryBuffer, "__init__")}, path)
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint(path)
    message = _one_line_error(excinfo)
    assert message.startswith(f"checkpoint {path} needs global builtins.getattr, ")
    assert message.endswith(TRUST_HINT)
    ok = tmp_path / "ok.pth"
    torch.save({"state_dict": {}, "f": Payload(getattr, HistoryBuffer, "mean")}, ok)
    assert load_checkpoint(ok)["f"] is HistoryBuffer.mean


def test_history_buffer_methods_are_not_overwritten_by_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = dict(HistoryBuffer._statistics_methods)
    assert before["mean"] is HistoryBuffer.mean
    # A HistoryBuffer whose pickled statistics_methods swaps "mean" for another allowed callable.
    state = {
        "max_length": 10,
        "_log_history": np.array([1.0, 3.0]),
        "_count_history": np.array([1.0, 1.0]),
        "statistics_methods": {"mean": np.ndarray},
    }
    path = tmp_path / "buffer.pth"
    with monkeypatch.context() as patch:
        patch.setattr(HistoryBuffer, "__getstate__", lambda self: state)
        torch.save({"state_dict": {}, "buffer": HistoryBuffer()}, path)
    loaded = load_checkpoint(path)["buffer"]
    assert type(loaded) is HistoryBuffer
    assert HistoryBuffer._statistics_methods == before
    assert loaded.mean() == 2.0


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_protocol_4_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = Payload(builtins.exec, _write_marker_code(marker))
    torch.save({"state_dict": {}, "meta": payload}, path, pickle_protocol=4)
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint(path)
    assert _one_line_error(excinfo) == (
        f"checkpoint {path} cannot be loaded safely (weights-only unpickler: "
        f"Unsupported operand 149); {TRUST_HINT}"
    )
    assert not marker.exists()


def test_raw_pickle_is_not_unpickled_even_when_trusted(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(builtins.exec, _write_marker_code(marker))))
    for trusted in (False, True):
        with pytest.raises(ValueError) as excinfo:
            load_checkpoint(path, trusted=trusted)
        assert _one_line_error(excinfo) == (
            f"{path} is not a PyTorch checkpoint (not a file written by torch.save)"
        )
    assert not marker.exists()


# --- state dicts, formats and refusals ------------------------------------------------------


def test_bare_state_dict_is_wrapped(tmp_path: Path) -> None:
    source = nn.Linear(3, 2)
    path = tmp_path / "bare.pth"
    torch.save(source.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert set(ckpt) == {"state_dict"}
    _assert_bit_identical(dict(ckpt["state_dict"]), _params(source))
    target = nn.Linear(3, 2)
    assert load_weights(target, path).keys() == {"state_dict"}
    _assert_bit_identical(_params(target), _params(source))


def test_checkpoint_with_state_dict_key_is_returned_as_loaded(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 3, "extra": [1, "a"]}, path)
    ckpt = load_checkpoint(path)
    assert set(ckpt) == {"state_dict", "epoch", "extra"}
    assert ckpt["epoch"] == 3 and ckpt["extra"] == [1, "a"]


def test_legacy_format_with_numpy1_names_loads(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    obj = {"state_dict": {"w": torch.arange(3.0)}, "meta": {"eta": np.float64(1.5)}}
    obj["meta"]["hist"] = np.array([1, 2], dtype=np.int32)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ckpt = load_checkpoint(path)
    assert ckpt["meta"]["eta"] == 1.5 and type(ckpt["meta"]["eta"]) is np.float64
    assert ckpt["meta"]["hist"].tolist() == [1, 2] and ckpt["meta"]["hist"].dtype == np.int32
    assert torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"^checkpoint {path} does not exist$"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_weights(nn.Linear(1, 1), path)


def _zip_without_data(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hi")


def _truncated_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(256)), "not a file written"),
        (lambda p: p.write_text("model weights\n"), "not a file written"),
        (lambda p: p.write_bytes(b""), "not a file written"),
        (_zip_without_data, "a zip archive without data.pkl"),
        (_truncated_checkpoint, "broken zip archive"),
    ],
    ids=["random", "text", "empty", "zip", "truncated"],
)
def test_not_a_checkpoint(tmp_path: Path, write: Any, reason: str) -> None:
    path = tmp_path / "file.pth"
    write(path)
    with pytest.raises(ValueError) as excinfo:
        load_checkpoint(path)
    message = _one_line_error(excinfo)
    assert message.startswith(f"{path} is not a PyTorch checkpoint (")
    assert reason in message


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.ones(1)], "it holds a list, not a dict"),
        ({"model": {"w": torch.ones(1)}, "epoch": 1}, "keys: 'model', 'epoch'"),
    ],
)
def test_no_state_dict(tmp_path: Path, content: Any, message: str) -> None:
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"^checkpoint {path} holds no state dict: .*{message}"):
        load_checkpoint(path)


# --- load_weights: mismatches and prefixes --------------------------------------------------


class Net(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, hidden, 3)
        self.bn = nn.BatchNorm2d(hidden)
        self.head = nn.Linear(hidden, 2)


def _ckpt_from(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state, "meta": {}}, path)
    return path


def _other_state(hidden: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return {k: v + 1 for k, v in Net(hidden).state_dict().items()}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s.pop("head.bias"),
            "1 missing keys (first: head.bias), 0 unexpected keys, 0 shape mismatches",
        ),
        (
            lambda s: s.update({"extra.weight": torch.zeros(1), "extra.bias": torch.zeros(1)}),
            "0 missing keys, 2 unexpected keys (first: extra.weight), 0 shape mismatches",
        ),
        (
            lambda s: s.update({"head.weight": torch.zeros(3, 4)}),
            "0 missing keys, 0 unexpected keys, 1 shape mismatches "
            "(first: head.weight ckpt [3, 4] vs model [2, 4])",
        ),
        (
            lambda s: (s.pop("bn.running_mean"), s.update({"x": torch.zeros(1)})),
            "1 missing keys (first: bn.running_mean), 1 unexpected keys (first: x), "
            "0 shape mismatches",
        ),
    ],
    ids=["missing", "unexpected", "shape", "both"],
)
def test_mismatch_leaves_model_unchanged(tmp_path: Path, edit: Any, expected: str) -> None:
    state = _other_state()
    edit(state)
    path = _ckpt_from(tmp_path, state)
    model = Net()
    before = _params(model)
    with pytest.raises(ValueError) as excinfo:
        load_weights(model, path)
    assert _one_line_error(excinfo) == f"checkpoint {path} does not match the model: {expected}"
    _assert_bit_identical(_params(model), before)


def test_all_shapes_wrong_reports_count_and_first(tmp_path: Path) -> None:
    path = _ckpt_from(tmp_path, _other_state(hidden=8))
    model = Net(hidden=4)
    before = _params(model)
    with pytest.raises(ValueError) as excinfo:
        load_weights(model, path, strict=False)
    assert _one_line_error(excinfo).endswith(
        "0 missing keys, 0 unexpected keys, 7 shape mismatches "
        "(first: conv.weight ckpt [8, 1, 3, 3] vs model [4, 1, 3, 3])"
    )
    _assert_bit_identical(_params(model), before)


def test_non_strict_ignores_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = _other_state()
    del state["head.bias"]
    state["extra"] = torch.zeros(1)
    model = Net()
    bias_before = model.head.bias.detach().clone()
    load_weights(model, _ckpt_from(tmp_path, state), strict=False)
    assert torch.equal(model.head.weight, state["head.weight"])
    assert torch.equal(model.head.bias, bias_before)


def test_module_prefix_is_stripped(tmp_path: Path) -> None:
    state = _other_state()
    path = _ckpt_from(tmp_path, {f"module.{k}": v for k, v in state.items()})
    model = Net()
    load_weights(model, path)
    _assert_bit_identical(_params(model), state)
    with pytest.raises(ValueError, match=r"9 missing keys .* 9 unexpected keys"):
        load_weights(Net(), path, prefix_strip=())


def test_prefix_kept_when_some_keys_lack_it_or_the_model_has_it(tmp_path: Path) -> None:
    state = _other_state()
    mixed = {f"module.{k}" if k.startswith("conv") else k: v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"2 missing keys .* 2 unexpected keys"):
        load_weights(Net(), _ckpt_from(tmp_path, mixed))

    wrapper = nn.Sequential()
    wrapper.add_module("module", Net())
    wrapped_state = {f"module.{k}": v for k, v in state.items()}
    load_weights(wrapper, _ckpt_from(tmp_path, wrapped_state))
    _assert_bit_identical(_params(wrapper), wrapped_state)


# --- save_weights ---------------------------------------------------------------------------


def test_save_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Net()
    source.bn.running_mean += 1.0
    meta = {"round": 3, "lr": 0.1, "ok": True, "none": None, "tags": ["a", ("b", 2)], "d": {}}
    path = tmp_path / "model.pth"
    path.write_bytes(b"old contents")
    save_weights(source, path, meta=meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    assert zipfile.is_zipfile(path)

    ckpt = load_checkpoint(path)
    assert set(ckpt) == {"state_dict", "meta"}
    assert ckpt["meta"] == meta
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
    target = Net()
    assert load_weights(target, path)["meta"] == meta
    _assert_bit_identical(_params(target), _params(source))

    save_weights(source, tmp_path / "no_meta.pth")
    assert load_checkpoint(tmp_path / "no_meta.pth")["meta"] == {}


class _Thing:
    pass


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _cycle() -> dict[str, Any]:
    meta: dict[str, Any] = {"a": []}
    meta["a"].append(meta)
    return meta


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"loss": np.float64(0.5)}, "meta['loss'] is a numpy.float64; "),
        ({"path": [Path("x")]}, f"meta['path'][0] is a {_name(type(Path('x')))}; "),
        ({"t": torch.tensor(1.0)}, "meta['t'] is a torch.Tensor; "),
        ({"s": {"nested": {1, 2}}}, "meta['s']['nested'] is a builtins.set; "),
        ({"obj": _Thing()}, f"meta['obj'] is a {_name(_Thing)}; "),
        ({"d": {1: "a"}}, "meta['d'] has a key 1 that is not a str"),
        (_cycle(), "meta['a'][0] contains itself (a reference cycle)"),
        (["not", "a", "dict"], "meta must be a dict, not a list"),
    ],
    ids=["numpy", "path", "tensor", "set", "object", "int-key", "cycle", "list"],
)
def test_save_weights_refuses_non_plain_meta(tmp_path: Path, meta: Any, message: str) -> None:
    path = tmp_path / "model.pth"
    with pytest.raises(ValueError) as excinfo:
        save_weights(Net(), path, meta=meta)
    assert message in _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_save_weights_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.pth"
    save_weights(nn.Linear(2, 2), path, meta={"v": 1})
    old = path.read_bytes()

    def broken_save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(nn.Linear(2, 2), path, meta={"v": 2})
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_save_weights_missing_folder(tmp_path: Path) -> None:
    path = tmp_path / "no" / "model.pth"
    with pytest.raises(FileNotFoundError, match=f"folder {path.parent} .* does not exist"):
        save_weights(nn.Linear(1, 1), path)
