"""Bad manifest entries and reload without restart, through the real server over gRPC.

- bad entries (schema error, missing file, tensor names that are not in the graph, an ambiguous
  graph, a graph that does not run at warm-up, bytes that are no ONNX) are logged, listed by
  ListModels as unavailable with the reason, answered FAILED_PRECONDITION with that reason, and the
  other models keep serving, both when the server starts with them and when they arrive by reload;
- `xaiserve models add` refuses a bad file, wrong names and a missing file with a clear message;
- models are added, swapped to a new version and removed while calls run in a loop: every call
  answers OK, or NOT_FOUND once its model is gone; none fails otherwise.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from torch import nn

from tests.serverutil import running_server
from tests.tiny_models import MEAN, STD, build_store
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service import cli_models
from xaiserve.service.modelstore import add_entry, remove_entry
from xaiserve.service.tensors import from_tensor

torch.set_num_threads(1)


def png(h: int = 32, w: int = 32) -> bytes:
    a = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _onnx(
    module: nn.Module, path: Path, inputs: list[str], outputs: list[str], size: int = 32, dynamic: bool = True
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(2, 3, size, size),),
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={n: {0: "b"} for n in inputs + outputs} if dynamic else None,
            opset_version=17,
            dynamo=False,
        )
    return path


class TwoHeads(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))


def _write_manifest(store: Path, extra: list[dict]) -> None:
    """Append entries by hand (as a user editing the JSON would), replacing the file atomically."""
    data = json.loads((store / "manifest.json").read_text())
    data["models"] += extra
    tmp = store / ".manual.json"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, store / "manifest.json")


def _entry(name: str, onnx: str, **kw) -> dict:
    return {
        "name": name,
        "version": "1",
        "kind": kw.pop("kind", "encoder"),
        "files": {"onnx": onnx},
        "input": kw.pop("input", {"height": 32, "width": 32, "channels": 3, "mean": MEAN, "std": STD}),
        **kw,
    }


def bad_entries(store: Path) -> dict[str, str]:
    """Write the bad models' files and entries; returns name -> a phrase its reason must contain."""
    _onnx(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 5)),
        store / "bad-graph/1/model.onnx",
        ["image"],
        ["output"],
    )
    _onnx(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        store / "wrong-names/1/model.onnx",
        ["input"],
        ["logits"],
    )
    _onnx(TwoHeads(), store / "ambiguous/1/model.onnx", ["input"], ["a", "b"])
    (store / "garbage/1").mkdir(parents=True)
    (store / "garbage/1/model.onnx").write_bytes(b"\x08\x01this is not a graph" * 10)
    entries = [
        _entry("missing-file", "missing-file/1/model.onnx"),
        _entry("wrong-names", "wrong-names/1/model.onnx", io={"image": "pixels"}),
        _entry("ambiguous", "ambiguous/1/model.onnx"),
        # a 32 x 32 graph (flattened map) declared 48 x 48: fails at warm-up
        _entry(
            "bad-graph",
            "bad-graph/1/model.onnx",
            input={"height": 48, "width": 48, "channels": 3, "mean": MEAN, "std": STD},
        ),
        _entry("garbage", "garbage/1/model.onnx"),
        _entry("bad-schema", "tiny-encoder/1/model.onnx", input={"height": -3, "width": 32, "channels": 3}),
        _entry("orphan-nemu", "tiny-nemu/1/model.onnx", kind="nem_u", explains="missing-file:1"),
    ]
    _write_manifest(store, entries)
    return {
        "missing-file": "files.onnx: missing-file/1/model.onnx is missing",
        "wrong-names": "io.image names 'pixels'",
        "ambiguous": "cannot tell which tensor is 'output'",
        "bad-graph": "does not run on a 3x48x48 input",
        "garbage": "not an ONNX graph",
        "bad-schema": "input.height: -3 is less than the minimum of 1",
        "orphan-nemu": "explains missing-file:1, which is unavailable",
    }


def check_unavailable(stub, expected: dict[str, str]) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    for name, phrase in expected.items():
        assert name in models, name
        assert not models[name].available and phrase in models[name].unavailable_reason, (
            name,
            models[name].unavailable_reason,
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.Explain(
                pb.ExplainRequest(
                    model=name, image=pb.Image(encoded=png()), options=pb.ExplainOptions(method="saliency")
                ),
                timeout=30,
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
        assert "unavailable" in e.value.details() and phrase in e.value.details(), e.value.details()
    assert models["tiny-nemu"].available and models["tiny-encoder"].available
    r = stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png())), timeout=30)
    assert from_tensor(r.mask).shape == (32, 32)
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitJob(pb.JobRequest(method="relax", model="wrong-names", image=pb.Image(encoded=png())), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "io.image" in e.value.details()


@pytest.mark.slow
def test_server_starts_and_serves_the_others_with_bad_entries(tmp_path, caplog):
    store = build_store(tmp_path / "store", slow=False)
    expected = bad_entries(store)
    with caplog.at_level("ERROR", logger="xaiserve.registry"):
        with running_server(store, job_workers=0) as srv:
            check_unavailable(srv.stub(), expected)
    logged = {r.__dict__.get("model", "") for r in caplog.records if r.getMessage() == "model unavailable"}
    assert {f"{n}:1" for n in expected} <= logged


@pytest.mark.slow
def test_bad_entries_arriving_by_reload_leave_the_others_serving(tmp_path):
    store = build_store(tmp_path / "store", slow=False)
    with running_server(store, reload_interval_s=0.1, job_workers=0) as srv:
        stub = srv.stub()
        expected = bad_entries(store)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            names = {m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
            if set(expected) <= names:
                break
            time.sleep(0.1)
        check_unavailable(stub, expected)
        # a manifest that is not JSON: logged, and the current set keeps serving
        (store / "manifest.json").write_text("{ not json")
        time.sleep(0.5)
        stub.Explain(pb.ExplainRequest(model="tiny-nemu", image=pb.Image(encoded=png())), timeout=30)


def test_models_add_refuses_bad_files_with_a_clear_message(tmp_path, capsys):
    store = build_store(tmp_path / "store", slow=False)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01junk" * 20)
    assert (
        cli_models.main(
            [
                "add",
                "junk",
                str(tmp_path / "junk.onnx"),
                "--kind",
                "encoder",
                "--input",
                "3x32x32",
                "--store",
                str(store),
            ]
        )
        == 2
    )
    assert "junk.onnx is not an ONNX graph ONNX Runtime can load" in capsys.readouterr().err
    path = _onnx(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        tmp_path / "names/model.onnx",
        ["input"],
        ["logits"],
    )
    assert (
        cli_models.main(["add", "names", str(path), "--kind", "encoder", "--io", "image=pixels", "--store", str(store)])
        == 2
    )
    assert "io.image names 'pixels', which model.onnx does not have" in capsys.readouterr().err
    assert (
        cli_models.main(["add", "gone", str(tmp_path / "nope.onnx"), "--kind", "encoder", "--store", str(store)]) == 2
    )
    assert "nope.onnx does not exist" in capsys.readouterr().err
    assert (
        cli_models.main(
            ["add", "names", str(path), "--kind", "classifier", "--labels", str(path), "--store", str(store)]
        )
        == 2
    )
    assert "is not a UTF-8 text file" in capsys.readouterr().err
    (tmp_path / "two.txt").write_text("yes\nno\n")
    assert (
        cli_models.main(
            [
                "add",
                "names",
                str(path),
                "--kind",
                "classifier",
                "--labels",
                str(tmp_path / "two.txt"),
                "--store",
                str(store),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "2 labels" in err and "for 4 classifier outputs" in err, err
    # nothing was left in the store by the refused adds; the names are inferred when unambiguous
    assert not (store / "junk").exists() and not (store / "names").exists()
    assert cli_models.main(["add", "names", str(path), "--kind", "encoder", "--store", str(store)]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["io"] == {"image": "input", "output": "logits"} and entry["output_dim"] == 4
    assert cli_models.main(["list", "--store", str(store)]) == 0
    assert "names:1" in capsys.readouterr().out
    assert cli_models.main(["remove", "tiny-encoder", "--store", str(store)]) == 2  # tiny-nemu explains it
    assert "tiny-nemu:1 explain tiny-encoder" in capsys.readouterr().err
    assert cli_models.main(["remove", "names:1", "--store", str(store)]) == 0
    assert not (store / "names").exists()


@pytest.mark.slow
def test_add_swap_and_remove_under_load_over_grpc(tmp_path):
    """Calls in a loop on three threads while models are added, swapped and removed."""
    store = build_store(tmp_path / "store", slow=False)
    enc = store / "tiny-encoder/1/model.onnx"
    with running_server(store, reload_interval_s=0.05, job_workers=0, max_delay_ms=1.0) as srv:
        stub = srv.stub()
        stop = threading.Event()
        seen: dict[str, dict[str, int]] = {"tiny-nemu": {}, "extra": {}, "tiny-nemu:1": {}}
        versions: set[str] = set()
        lock = threading.Lock()

        def call(model: str, method: str) -> None:
            while not stop.is_set():
                try:
                    r = stub.Explain(
                        pb.ExplainRequest(
                            model=model, image=pb.Image(encoded=png()), options=pb.ExplainOptions(method=method)
                        ),
                        timeout=30,
                    )
                    code = "OK"
                    if model == "tiny-nemu":
                        with lock:
                            versions.add(r.model)
                except grpc.RpcError as e:
                    code = e.code().name
                with lock:
                    seen[model][code] = seen[model].get(code, 0) + 1

        threads = [
            threading.Thread(target=call, args=a, daemon=True)
            for a in (("tiny-nemu", ""), ("extra", ""), ("tiny-nemu:1", ""))
        ]
        for t in threads:
            t.start()
        try:
            for cycle in range(2):
                shutil.copytree(store / "tiny-nemu/1", store / f"extra/{cycle + 1}", dirs_exist_ok=True)
                add_entry(
                    store,
                    {
                        "name": "extra",
                        "version": str(cycle + 1),
                        "kind": "nem_u",
                        "files": {"onnx": f"extra/{cycle + 1}/model.onnx"},
                        "explains": "tiny-encoder:1",
                        "input": {"height": 32, "width": 32, "channels": 3, "mean": MEAN, "std": STD},
                    },
                )
                time.sleep(0.6)
                # a new version of the masking network: its batcher and session are swapped in
                shutil.copytree(store / "tiny-nemu/1", store / f"tiny-nemu/{cycle + 2}", dirs_exist_ok=True)
                add_entry(
                    store,
                    {
                        "name": "tiny-nemu",
                        "version": str(cycle + 2),
                        "kind": "nem_u",
                        "files": {"onnx": f"tiny-nemu/{cycle + 2}/model.onnx"},
                        "explains": "tiny-encoder:1",
                        "input": {"height": 32, "width": 32, "channels": 3, "mean": MEAN, "std": STD},
                    },
                )
                time.sleep(0.6)
                remove_entry(store, "extra")
                time.sleep(0.6)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert enc.exists()
        with lock:
            assert set(seen["tiny-nemu"]) == {"OK"} and seen["tiny-nemu"]["OK"] > 5, seen
            assert set(seen["tiny-nemu:1"]) == {"OK"}, seen
            # `extra` answers OK while it is in the manifest, NOT_FOUND before and after it
            assert set(seen["extra"]) == {"OK", "NOT_FOUND"}, seen
            assert versions >= {"tiny-nemu:2", "tiny-nemu:3"}, versions
        assert srv.running.watcher.reloads >= 6


@pytest.mark.slow  # a server subprocess: ~15 s
def test_sighup_reloads_when_polling_is_off(tmp_path):
    import signal

    from tests.serverutil import server_process

    store = build_store(tmp_path / "store", slow=False)
    with server_process(store, reload_interval_s=0, job_workers=0, load_models="all") as srv:
        stub = srv.stub()
        shutil.copytree(store / "tiny-nemu/1", store / "late/1")
        add_entry(
            store,
            {
                "name": "late",
                "version": "1",
                "kind": "nem_u",
                "files": {"onnx": "late/1/model.onnx"},
                "explains": "tiny-encoder:1",
                "input": {"height": 32, "width": 32, "channels": 3, "mean": MEAN, "std": STD},
            },
        )
        time.sleep(1.5)  # polling is off: nothing happens by itself
        with pytest.raises(grpc.RpcError) as e:
            stub.Explain(pb.ExplainRequest(model="late", image=pb.Image(encoded=png())), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        srv.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = stub.Explain(pb.ExplainRequest(model="late", image=pb.Image(encoded=png())), timeout=30)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                time.sleep(0.2)
        else:
            raise AssertionError("the model did not appear after SIGHUP")
        assert r.model == "late:1" and srv.process.poll() is None
