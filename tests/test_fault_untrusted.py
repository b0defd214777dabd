"""Untrusted files: loading a model, adapter or checkpoint never runs code from it; config values are checked.

The attack is a pickle whose `__reduce__` makes the unpickler call a function, here
`open(marker, "w")`: harmless, but visible. Each test first shows the payload is live (a
plain torch.load creates the marker), then that minilora's path refuses it and the marker
never appears. Weights read from a trusted pickle are compared with transformers' logits
(fp32 on the CPU, same weights, 1e-5).
"""
import json
import shutil

import pytest
import torch

from conftest import tiny_hf_model
from minilora import train as T
from minilora.adapter import load_adapter
from minilora.checkpoint import load_model
from test_train import tiny_run_args


class Payload:
    """Unpickling this calls open(path, "w"): code running at load time."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_payload(path, marker):
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)
    assert not marker.exists()  # saving a payload does not run it


def assert_payload_is_live(path, marker):
    f = torch.load(path, weights_only=False)["model.embed_tokens.weight"]  # what an unsafe loader does
    f.close()
    assert marker.exists()
    marker.unlink()


def pickle_copy(src_folder, dst_folder, hf_model, shards=1):
    """The same model as pytorch_model.bin (or `shards` pieces with an index), and no safetensors."""
    dst_folder.mkdir()
    for f in src_folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst_folder / f.name)
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if shards == 1:
        torch.save(sd, dst_folder / "pytorch_model.bin")
        return dst_folder
    names, weight_map = sorted(sd), {}
    for i in range(shards):
        part = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: sd[k] for k in names[i::shards]}, dst_folder / part)
        weight_map.update({k: part for k in names[i::shards]})
    (dst_folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst_folder


@pytest.mark.parametrize("shards", [1, 3])
def test_pickle_weights_only_with_the_users_word(tmp_path, shards):
    hf = tiny_hf_model(tmp_path / "safe", "llama")
    folder = pickle_copy(tmp_path / "safe", tmp_path / "pickled", hf, shards)
    with pytest.raises(FileNotFoundError, match=r"pickle files can run code.*--trust-pickle-files"):
        load_model(folder, quantize=None, progress=False)
    model = load_model(folder, quantize=None, progress=False, trust_pickle=True)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_pickle_that_runs_code_is_refused_even_when_trusted(tmp_path):
    hf = tiny_hf_model(tmp_path / "safe", "llama")
    folder = pickle_copy(tmp_path / "safe", tmp_path / "evil", hf)
    marker = tmp_path / "pwned"
    write_payload(folder / "pytorch_model.bin", marker)
    assert_payload_is_live(folder / "pytorch_model.bin", marker)
    with pytest.raises(FileNotFoundError, match="pickle files can run code"):
        load_model(folder, quantize=None, progress=False)
    refused = r"pytorch_model.bin: refused by the weights-only unpickler.*Unsupported global: GLOBAL io.open"
    with pytest.raises(ValueError, match=refused):
        load_model(folder, quantize=None, progress=False, trust_pickle=True)
    assert not marker.exists()


def test_pickle_adapter_is_refused(tmp_path, tiny_llama):
    folder, _ = tiny_llama
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    marker = tmp_path / "pwned"
    write_payload(adapter / "adapter_model.bin", marker)
    model = load_model(folder, quantize=None, progress=False)
    with pytest.raises(FileNotFoundError, match=r"adapter_model.bin is a pickle and is not read"):
        load_adapter(model, adapter)
    assert not marker.exists()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_untrusted")


def test_train_flag(base, capsys):
    args = tiny_run_args(base, base / "o1", max_steps=1)  # builds base / "m" (safetensors)
    from safetensors.torch import load_file

    class Holder(torch.nn.Module):  # pickle_copy wants something with a state_dict
        def state_dict(self):
            return load_file(base / "m" / "model.safetensors")

    pickle_copy(base / "m", base / "mp", Holder())
    args[args.index("--model") + 1] = str(base / "mp")
    with pytest.raises(SystemExit) as e:
        T.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin: pickle files can run code" in err and "--trust-pickle-files" in err
    T.main(args + ["--trust-pickle-files"])
    assert (base / "o1" / "adapter" / "adapter_model.safetensors").is_file()


def test_tampered_trainer_state_is_refused_on_resume(base, capsys):
    out = base / "tampered"
    args = tiny_run_args(base, out, max_steps=2, save_every=1)
    T.train(T.parse_config(args))
    shutil.rmtree(out / "adapter")
    ck = out / "checkpoints" / "step-000002"
    marker = base / "pwned"
    write_payload(ck / "trainer_state.pt", marker)
    assert_payload_is_live(ck / "trainer_state.pt", marker)
    with pytest.raises(SystemExit) as e:
        T.main(args + ["--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (f"cannot resume from {ck}: its trainer_state.pt is unreadable "
            "(UnpicklingError: Unsupported global: GLOBAL io.open") in err
    assert "Move that folder away to resume from the checkpoint before it." in err
    assert not marker.exists()
    shutil.move(ck, base / "moved-away")  # what the message says to do
    T.main(args + ["--resume"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("values,message", [
    ({"lr": -1}, "--lr must be a positive number, got -1.0."),
    ({"lr": float("nan")}, "--lr must be finite, got nan."),
    ({"r": 0}, "--r must be a positive integer, got 0."),
    ({"batch_size": True}, "batch_size must be int, got true."),
    ({"r": 8.5}, "r must be int, got 8.5."),
    ({"dropout": 1.5}, "--dropout must be in [0, 1), got 1.5."),
    ({"max_grad_norm": float("inf")}, "--max-grad-norm must be finite, got inf."),
    ({"optim": "sgd"}, "--optim must be one of adamw8bit, adamw, paged_adamw8bit."),
    ({"targets": ["q_proj"]}, 'targets must be str, got ["q_proj"].'),
    ({"max-bad-steps": 0}, "--max-bad-steps must be >= 1, got 0."),
])
def test_config_file_values_are_checked_for_type_and_range(tmp_path, values, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values))  # NaN and Infinity: Python's json writes and reads them
    with pytest.raises(T.UsageError) as e:
        T.parse_config(["--model", "m", "--data", "d.jsonl", "--config", str(path)])
    assert str(e.value) == f"--config {path}: {message}"
