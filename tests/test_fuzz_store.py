"""Fuzzing the store loader: random bytes, damaged archives and edited stores (SPEC §4).

Every case must end in a :class:`StoreError` subclass, or load a store that is
then either refused for this model (also a StoreError) or explains inputs:
never another exception, a crash or a hang (per-case alarm). Edits that keep a
store well-formed (e.g. one finite pattern value changed) load: they cannot be
told from a genuine store.
"""
from __future__ import annotations

import copy
import io
import json
import struct
import signal
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _hardening import mixed_batches, tiny_model
from untangle_ext import Attributor, SignalEstimator
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from untangle_ext.store import SignalStore, StoreError, model_fingerprint

CASE_SECONDS = 20  # generous: the machine may be loaded; a real hang never ends
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """Raised by the per-case alarm; BaseException so no ``except Exception`` can swallow it."""


@contextmanager
def alarm(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"a loader case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    model = tiny_model()
    store = SignalEstimator(model, progress=False).fit(mixed_batches())[0]
    buf = io.BytesIO()
    torch.save(store.to_dict(), buf)
    out = tmp_path_factory.mktemp("fuzz")
    v2 = store.save(out / "valid_class_0.pkl").read_bytes()
    return {"model": model, "attributor_program": SignalEstimator(model, progress=False).program,
            "fingerprint": model_fingerprint(model), "valid": buf.getvalue(), "valid_v2": v2,
            "dict": lambda: copy.deepcopy(store.to_dict()),
            "x": mixed_batches()[0][0], "dir": out}


def outcome(env, data: bytes) -> str:
    """Load ``data`` as a store and use it; returns what happened, fails on anything undocumented."""
    path: Path = env["dir"] / "case_class_0.pkl"
    path.write_bytes(data)
    with alarm(CASE_SECONDS):
        try:
            store = SignalStore.load(path)
        except StoreError as exc:
            assert str(path) in str(exc) or "store" in str(exc)
            return type(exc).__name__
        try:
            store.check_matches(env["attributor_program"], env["fingerprint"])
        except StoreError as exc:
            return "loaded, then " + type(exc).__name__
        exp = Attributor(env["model"], {store.class_id: store}).explain(
            env["x"], target=max(store.class_id, 0))
        assert exp.attributions.shape == (len(env["x"]), 1, *env["x"].shape[1:])
        return "loaded and usable"


def run(env, strategy, examples: int) -> Counter:
    seen: Counter = Counter()

    @settings(max_examples=examples, **FUZZ)
    @given(strategy)
    def case(data):
        seen[outcome(env, data)] += 1

    case()
    assert sum(seen.values()) >= examples
    print(f"\n{strategy!r:.60}: {dict(seen)}")
    return seen


# ------------------------------------------------------------------------------------------------------------
# byte strings


def test_random_bytes(env):
    seen = run(env, st.one_of(st.binary(max_size=4096), st.binary(max_size=2048).map(lambda b: b"PK\x03\x04" + b),
                              st.binary(max_size=2048).map(lambda b: struct.pack("<Q", len(b) + 1) + b"{" + b)),
               150)
    assert set(seen) <= {"StoreCorruptError"}


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """1-3 edits of a valid store file: truncations, bit flips, overwrites, deletions, insertions."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "delete", "insert"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[i:]
        elif op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[i:i + len(chunk)] = chunk
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 64))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def test_damaged_store_files(env):
    run(env, damaged(env["valid"]), 200)


def test_damaged_v2_store_files(env):
    seen = run(env, damaged(env["valid_v2"]), 200)
    assert sum(n for k, n in seen.items() if not k.startswith("loaded")) >= 100


# ------------------------------------------------------------------------------------------------------------
# edited stores: valid archives whose content was changed


def _laughs(depth: int = 40) -> list:
    x: list = []
    for _ in range(depth):
        x = [x, x]  # 2**40 paths through shared references: any naive walk would never finish
    return x


def _self_list() -> list:
    x: list = []
    x.append(x)
    return x


ODD_TENSORS = [
    lambda: torch.zeros(0), lambda: torch.tensor(float("nan")), lambda: torch.full((3, 8), float("inf")),
    lambda: torch.ones(3, 8, dtype=torch.int64), lambda: torch.ones(3, 8, dtype=torch.complex64),
    lambda: torch.ones(3, 8, dtype=torch.bool), lambda: torch.ones(8, 3).t(),
    lambda: torch.ones(1).expand(3, 8), lambda: torch.ones(1).expand(10 ** 9),
    lambda: torch.eye(3, 8).to_sparse(), lambda: nn.Parameter(torch.ones(3, 8)), lambda: torch.ones(3, 8).double(),
    lambda: torch.ones(2, 1, 3, 3, dtype=torch.float16), lambda: torch.ones(24)[::3],
    lambda: torch.tensor(2.0 ** 60, dtype=torch.float64), lambda: torch.tensor(-1.0, dtype=torch.float64),
]
NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300), st.binary(max_size=20), st.lists(st.integers(-3, 10 ** 6), max_size=6),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3), st.tuples(st.integers(), st.text(max_size=3)),
    st.sampled_from(ODD_TENSORS).map(lambda make: make()),
    st.sampled_from([_laughs, _self_list]).map(lambda make: make()),
    st.sampled_from(["all", "positive", "linear", "conv2d", "0", "4", "float32", "float64", "untangle_ext.signal_store"]),
    st.sampled_from([-1, 0, 1, 2, 3, 1, 7]),
)


def _slots(obj, path=(), seen=None):
    """Every (container, key) pair in the store dict, tensors included; each container visited once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((obj, k, path + (k,)))
        if isinstance(v, (dict, list)):
            out.extend(_slots(v, path + (k,), seen))
    return out


@st.composite
def edited(draw, make) -> bytes:
    """A valid store dict with 1-3 edits: values/types replaced, keys dropped/added, tensors swapped/reshaped/recast."""
    data = make()
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(data)
        tensors = [s for s in slots if isinstance(s[0][s[1]], torch.Tensor) and s[0][s[1]].numel() < 10 ** 4
                   and s[0][s[1]].layout == torch.strided]
        op = draw(st.sampled_from(["replace", "drop", "add", "swap", "recast", "reshape", "poke"]))
        if op in ("swap", "recast", "reshape", "poke") and tensors:
            obj, key, _ = draw(st.sampled_from(tensors))
            t = obj[key]
            if op == "swap":
                other, okey, _ = draw(st.sampled_from(tensors))
                obj[key], other[okey] = other[okey], t
            elif op == "recast":
                obj[key] = t.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.float32,
                                                      torch.int32, torch.uint8, torch.bool])))
            elif op == "reshape":
                obj[key] = draw(st.sampled_from([t.reshape(-1), t.unsqueeze(0), t.t() if t.dim() == 2 else t[None],
                                                 t[..., :1] if t.dim() else t[None], t.flip(0) if t.dim() else t]))
            elif t.numel() and t.is_floating_point():
                t = t.clone()
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
                    st.sampled_from([float("nan"), float("inf"), -1.0, 1e30, 0.5, 2.0 ** 54]))
                obj[key] = t
        elif op == "drop":
            dicts = [(o, k) for o, k, _ in slots if isinstance(o, dict)]
            obj, key = draw(st.sampled_from(dicts))
            del obj[key]
        elif op == "add":
            containers = [data] + [o[k] for o, k, _ in slots if isinstance(o[k], (dict, list))]
            target = draw(st.sampled_from(containers))
            if isinstance(target, dict):
                target[draw(st.one_of(st.text(max_size=8), st.integers()))] = draw(NASTY)
            else:
                target.append(draw(NASTY))
        else:
            obj, key, _ = draw(st.sampled_from(slots))
            obj[key] = draw(NASTY)
    buf = io.BytesIO()
    torch.save(data, buf)
    return buf.getvalue()


def test_edited_stores(env):
    seen = run(env, edited(env["dict"]), 200)
    assert sum(n for k, n in seen.items() if not k.startswith("loaded")) >= 100  # most edits must be caught


def test_top_level_not_a_dict(env):
    for obj in ([1, 2], "store", torch.ones(3), None, {"format": "untangle_ext.signal_store"}, _laughs()):
        buf = io.BytesIO()
        torch.save(obj, buf)
        assert outcome(env, buf.getvalue()) == "StoreCorruptError"


# ------------------------------------------------------------------------------------------------------------
# edited v2 stores: well-formed safetensors files whose header or tensors were changed

JSON_NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=False), st.text(max_size=300),
    st.lists(st.integers(-3, 10 ** 6), max_size=6), st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.sampled_from(["all", "positive", "conv2d", "0", "4", "float16", "float32", "untangle_ext.signal_store"]),
    st.sampled_from([-1, 0, 1, 2, 3, 7]), st.recursive(st.none(), lambda c: st.lists(c, max_size=2), max_leaves=50),
)


def _v2_parts(valid: bytes, path: Path) -> tuple[dict, dict, dict]:
    path.write_bytes(valid)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    return meta, json.loads(meta.pop("header")), tensors


@st.composite
def edited_v2(draw, parts) -> bytes:
    """A valid v2 store with 1-3 edits of its metadata, JSON header or tensors."""
    meta, header, tensors = copy.deepcopy(parts)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["meta", "header", "header_drop", "layer", "recast", "reshape", "poke", "drop",
                                   "rename", "swap"]))
        names = sorted(tensors)
        if op == "meta":
            meta[draw(st.sampled_from(["format", "format_version", "other"]))] = draw(
                st.sampled_from(["", "1", "2", "3", "x" * 300, "untangle_ext.signal_store", "-1"]))
        elif op == "header":
            header[draw(st.sampled_from(sorted(header) + ["extra"]))] = draw(JSON_NASTY)
        elif op == "header_drop" and header:
            del header[draw(st.sampled_from(sorted(header)))]
        elif op == "layer" and type(header.get("layers")) is list and header["layers"]:
            layer = draw(st.sampled_from(header["layers"]))
            if type(layer) is dict:
                layer[draw(st.sampled_from(["name", "kind", "weight_shape", "extra"]))] = draw(JSON_NASTY)
        elif op in ("recast", "reshape", "poke", "drop", "rename", "swap") and names:
            name = draw(st.sampled_from(names))
            t = tensors[name]
            if op == "recast":
                tensors[name] = t.to(draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.float32,
                                                           torch.int16, torch.int32, torch.uint8, torch.bool])))
            elif op == "reshape":
                tensors[name] = draw(st.sampled_from([t.reshape(-1), t.unsqueeze(0), t[..., :1].contiguous()
                                                      if t.dim() else t[None], t.flip(0) if t.dim() else t]))
            elif op == "poke" and t.numel():
                t = t.clone()
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(
                    st.sampled_from([float("nan"), float("inf"), -1.0, 1e30, 0.5, 2.0 ** 54, 30000, -32768]))
                tensors[name] = t
            elif op == "drop":
                del tensors[name]
            elif op == "rename":
                tensors[draw(st.sampled_from(["0/a_lin", "7/a_pos", "1/a_neg/exp", "x", "0/a_pos/exp/exp"]))] = \
                    tensors.pop(name)
            else:
                other = draw(st.sampled_from(names))
                tensors[name], tensors[other] = tensors[other], t
    return safetensors_bytes({k: v.contiguous() for k, v in tensors.items()},
                             metadata={**meta, "header": json.dumps(header)})


def test_edited_v2_stores(env):
    parts = _v2_parts(env["valid_v2"], env["dir"] / "parts_class_0.pkl")
    seen = run(env, edited_v2(parts), 200)
    assert sum(n for k, n in seen.items() if not k.startswith("loaded")) >= 100  # most edits must be caught
