"""Security: safetensors only for weights we write, no unpickling of user files, no remote code
unless the user asks for it, and the Hub token never lands in an output, a log or the console."""

import ast
import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import tiny_model, tiny_tokenizer
from hub_server import FakeHub

from hf_minitron import PrunedConfig
from hf_minitron.cli import main
from hf_minitron.commands.prune import PruneArguments, prune_checkpoint
from hf_minitron.hub import push_to_hub


ROOT = Path(__file__).parent.parent
TOKEN = "hf_SECRET_security_test_token_4242"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def python_sources() -> dict[str, str]:
    """Every Python source of the project: package, recipes, benchmarks, tests, and the notebooks' code cells."""
    sources = {}
    for folder in ("hf_minitron", "recipes", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            sources[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = [
            "".join(c["source"])
            for c in cells
            if c["cell_type"] == "code" and not "".join(c["source"]).startswith("%")
        ]
        sources[str(path.relative_to(ROOT))] = "\n".join(
            "\n".join(line for line in block.splitlines() if not line.lstrip().startswith(("!", "%")))
            for block in code
        )
    return sources


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


# ---------------------------------------------------------------------------------------------- static audit
def test_no_torch_load_without_weights_only():
    offending = []
    for name, source in python_sources().items():
        for call, func in calls(ast.parse(source)):
            if func == "torch.load" or func.endswith(".torch.load"):
                value = keyword(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offending.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
    assert offending == [], "torch.load without weights_only=True unpickles arbitrary objects:\n" + "\n".join(
        offending
    )


def test_no_pickle_loading_in_the_package():
    offending = []
    for name, source in python_sources().items():
        if not name.startswith(("hf_minitron", "recipes")):
            continue
        for call, func in calls(ast.parse(source)):
            if func in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "np.load", "numpy.load"):
                if func.endswith("np.load") and isinstance(keyword(call, "allow_pickle"), ast.Constant):
                    if keyword(call, "allow_pickle").value is False:
                        continue
                offending.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
    assert offending == []


# Files that play the user who asks for remote code: the custom-family test loads the model it wrote itself with an
# explicit trust_remote_code=True, as the README tells a user of such a family to do.
USER_OPT_IN = {"tests/pruning/test_custom_family.py"}


def test_trust_remote_code_is_never_switched_on_by_us():
    offending = []
    for name, source in python_sources().items():
        for call, _ in calls(ast.parse(source)):
            value = keyword(call, "trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True and name not in USER_OPT_IN:
                offending.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
        for node in ast.walk(ast.parse(source)):
            # dataclass fields: `trust_remote_code: bool = field(default=True)` would switch it on for every user
            if isinstance(node, ast.AnnAssign) and ast.unparse(node.target) == "trust_remote_code":
                default = keyword(node.value, "default") if isinstance(node.value, ast.Call) else node.value
                assert isinstance(default, ast.Constant) and default.value is False, f"{name}:{node.lineno}"
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        if "trust_remote_code" in text:
            offending.append(f"{path.relative_to(ROOT)} sets trust_remote_code")
    assert offending == [], "\n".join(offending)


def test_weights_are_written_with_safetensors_only():
    offending = []
    for name, source in python_sources().items():
        if not name.startswith(("hf_minitron", "recipes")):
            continue
        for call, func in calls(ast.parse(source)):
            if func == "torch.save" or func.endswith("pickle.dump"):
                offending.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
            value = keyword(call, "safe_serialization")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is True):
                offending.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
    assert offending == [], "\n".join(offending)


# ---------------------------------------------------------------------------------------------- behaviour
def test_pruned_checkpoint_holds_no_pickle(checkpoint, text_file, tmp_path):
    output = tmp_path / "pruned"
    config = PrunedConfig(hidden_size=16, num_attention_heads=2, calibration_samples=4, calibration_seq_length=16)
    args = PruneArguments(
        teacher=str(checkpoint), output_dir=str(output), calibration_data=str(text_file), text_column="content"
    )
    prune_checkpoint(args, config, show_progress=False)
    written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert "model.safetensors" in written and "importance/importance.safetensors" in written
    assert not [name for name in written if name.endswith(PICKLE_SUFFIXES)], written


def test_remote_code_in_a_checkpoint_is_not_executed(checkpoint, tmp_path):
    """A checkpoint that ships its own modeling code (`auto_map`) is refused, and its code never runs."""
    marker = tmp_path / "remote-code-ran"
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(model_type="evil_llama", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
    )
    args = PruneArguments(teacher=str(checkpoint), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        prune_checkpoint(args, PrunedConfig(hidden_size=16, num_attention_heads=2))
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the Hub token
@pytest.fixture
def hub(hub_env, monkeypatch):
    """A fake Hub on 127.0.0.1 that accepts TOKEN; the token only reaches us through $HF_TOKEN."""
    with FakeHub(tokens=[TOKEN]) as server:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def debug_log(tmp_path):
    """Every logger at DEBUG, written to a file (the run's log) as well as captured by pytest."""
    path = tmp_path / "logs" / "debug.log"
    path.parent.mkdir()
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield path
    root.removeHandler(handler)
    root.setLevel(old_level)
    handler.close()


def files_holding(directory: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return sorted(str(p) for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_token_never_written_by_push(hub, checkpoint, tmp_path, debug_log, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    (checkpoint / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Tiny\n")
    url = push_to_hub(checkpoint, "tester/tiny", token=TOKEN)
    assert url and hub.repos["tester/tiny"]["files"]
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text
    assert files_holding(tmp_path, TOKEN) == []
    assert not [path for path, content in hub.repos["tester/tiny"]["files"].items() if TOKEN.encode() in content]


def test_token_never_written_by_a_pipeline_run(hub, checkpoint, tmp_path, debug_log, capfd, caplog):
    """The whole chain from the CLI with $HF_TOKEN set, DEBUG logging and an upload: no file it writes (checkpoints,
    trainer_state.json, configs, results, card, logs), nothing it prints and nothing it uploads holds the token."""
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    recipe = {
        "teacher": str(checkpoint),
        "output_dir": str(out),
        "seq_length": 32,
        "max_train_samples": 8,
        "max_eval_samples": 2,
        "eval_tasks": "",
        "write_model_card": True,
        "keep_checkpoints": True,  # checkpoints (trainer_state.json, training_args.bin) are checked for the token too
        "push_to_hub": True,
        "hub_model_id": "tester/tiny-minitron",
        "pruning": {
            "hidden_size": 16,
            "num_attention_heads": 2,
            "calibration_samples": 4,
            "calibration_seq_length": 32,
        },
        "distillation": {
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "report_to": "none",
            "logging_steps": 1,
            "save_steps": 1,
        },
    }
    path = tmp_path / "minitron.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0

    uploaded = hub.repos["tester/tiny-minitron"]["files"]
    assert "model.safetensors" in uploaded and "README.md" in uploaded
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "trainer_state.json" for p in written) and debug_log.stat().st_size > 0
    assert files_holding(tmp_path, TOKEN) == []
    out_text, err_text = capfd.readouterr()
    assert TOKEN not in out_text + err_text + caplog.text
    assert not [name for name, content in uploaded.items() if TOKEN.encode() in content]
    assert not [name for name in uploaded if name.endswith(PICKLE_SUFFIXES)]


# ---------------------------------------------------------------------------------------------- secrets in what we write
def test_hub_token_is_not_pickled_into_training_args_bin(checkpoint, text_file, tmp_path):
    """`distill --hub_token ...`: every `checkpoint-N/training_args.bin` (a pickle of the arguments) leaves it out."""
    import pickle
    import zipfile

    student = tmp_path / "student"
    tiny_model("llama", seed=1, num_hidden_layers=1).save_pretrained(student)
    tiny_tokenizer().save_pretrained(student)
    run = tmp_path / "run"
    code = main(
        ["distill", "--student", str(student), "--teacher", str(checkpoint), "--dataset", str(text_file)]
        + ["--text_column", "content", "--seq_length", "16", "--max_train_samples", "8", "--max_steps", "2"]
        + ["--save_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none"]
        + ["--output_dir", str(run), "--hub_token", TOKEN]
    )
    assert code == 0
    saved = sorted(run.glob("checkpoint-*/training_args.bin"))
    assert len(saved) == 2
    for path in saved:
        assert TOKEN.encode() not in path.read_bytes()
        # Read back what torch.save pickled (no tensors in it: the pickle alone, without torch.load's unpickler).
        with zipfile.ZipFile(path) as archive:
            (pickled,) = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            args = pickle.loads(archive.read(pickled))
        assert args.hub_token is None and args.max_steps == 2
    assert files_holding(tmp_path, TOKEN) == []


@pytest.mark.parametrize(
    "config_class", ["DistillationConfig", "TeacherCorrectionConfig", "RPOConfig", "SFTConfig", "OnPolicyConfig"]
)
def test_hub_token_is_left_out_of_every_training_config_pickle(config_class, tmp_path):
    import copy
    import pickle

    from trl import SFTConfig

    from hf_minitron import DistillationConfig
    from hf_minitron.alignment import RPOConfig
    from hf_minitron.distillation.on_policy import OnPolicyConfig
    from hf_minitron.distillation.teacher_correction import TeacherCorrectionConfig
    from hf_minitron.hub import keep_token_out_of_pickles

    classes = (DistillationConfig, TeacherCorrectionConfig, RPOConfig, SFTConfig, OnPolicyConfig)
    cls = {c.__name__: c for c in classes}[config_class]
    config = cls(output_dir=str(tmp_path), report_to="none", hub_token=TOKEN, bf16=False)
    keep_token_out_of_pickles(config)  # what run_sft does with a TRL config; our own configs do it themselves
    assert config.hub_token == TOKEN and copy.deepcopy(config).hub_token == TOKEN  # still usable in this process
    assert TOKEN.encode() not in pickle.dumps(config) and TOKEN not in repr(config) + str(config)
    assert pickle.loads(pickle.dumps(config)).hub_token is None


def test_hub_errors_echoing_the_authorization_header_are_redacted(hub_env, checkpoint, capfd, caplog):
    """A Hub (or proxy) that echoes the request headers in its error body: the token is not in the message."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from hf_minitron.hub import HubUploadError

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": f"Bad request; headers were: Authorization: {self.headers['Authorization']}"})
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    caplog.set_level(logging.DEBUG)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(HubUploadError, match=r"HTTP 400.*Authorization: Bearer \*\*\*") as info:
            push_to_hub(checkpoint, "tester/tiny", token=TOKEN, endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    out, err = capfd.readouterr()
    assert TOKEN not in str(info.value) + out + err + caplog.text


def test_every_from_pretrained_passes_trust_remote_code():
    """transformers asks on stdin whether to run a checkpoint's own code unless `trust_remote_code` is given: every
    `Auto*.from_pretrained` of the package and the recipes passes it (False unless the user opted in)."""
    offending = []
    for name, source in python_sources().items():
        if not name.startswith(("hf_minitron", "recipes")):
            continue
        for call, func in calls(ast.parse(source)):
            if (
                func.startswith("Auto")
                and func.endswith(".from_pretrained")
                and keyword(call, "trust_remote_code") is None
            ):
                offending.append(f"{name}:{call.lineno}: {ast.unparse(call)}")
    assert offending == [], "\n".join(offending)


def _ship_remote_code(folder: Path, marker: Path, part: str) -> None:
    """Makes the checkpoint `folder` ship its own code for its config (`part="model"`) or its tokenizer, code that
    writes `marker` when it is imported."""
    code = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    if part == "model":
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="evil_llama", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
        (folder / "config.json").write_text(json.dumps(config))
        code += (
            "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        )
        (folder / "configuration_evil.py").write_text(code)
    else:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(
            tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
        )
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        code += "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        (folder / "tokenization_evil.py").write_text(code)


ENTRY_POINTS = ["trainer_student", "trainer_teacher", "distill", "run", "evaluate", "correct-teacher", "sft"]


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("part", ["model", "tokenizer"])
def test_remote_code_is_never_run_nor_asked_about(
    entry_point, part, checkpoint, text_file, tmp_path, monkeypatch, capsys
):
    """A user who would answer "y" at transformers' stdin prompt: every entry point refuses the checkpoint's code with
    an error naming trust_remote_code, without asking, and the code never runs."""
    from hf_minitron import DistillationConfig, DistillationTrainer

    marker = tmp_path / "remote-code-ran"
    _ship_remote_code(checkpoint, marker, part)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    data = ["--dataset", str(text_file), "--text_column", "content", "--seq_length", "16", "--max_train_samples", "4"]
    training = ["--max_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / "run")]
    student = tmp_path / "student"
    tiny_model("llama", seed=1, num_hidden_layers=1).save_pretrained(student)
    tiny_tokenizer().save_pretrained(student)
    if entry_point.startswith("trainer"):
        args = DistillationConfig(output_dir=str(tmp_path / "run"), report_to="none", max_steps=1)
        model, teacher = (
            (str(checkpoint), tiny_model()) if entry_point == "trainer_student" else (tiny_model(), str(checkpoint))
        )
        if entry_point == "trainer_student" and part == "tokenizer":
            DistillationTrainer(model=model, teacher_model=teacher, args=args)  # the student's tokenizer is not loaded
        else:
            with pytest.raises(ValueError, match="trust_remote_code"):
                DistillationTrainer(model=model, teacher_model=teacher, args=args)
    else:
        argv = {
            "distill": ["distill", "--student", str(student), "--teacher", str(checkpoint), *data, *training],
            "run": ["run", str(_recipe(checkpoint, tmp_path))],
            "evaluate": ["evaluate", "--model", str(checkpoint), "--output_file", str(tmp_path / "eval.json")],
            "correct-teacher": ["correct-teacher", "--teacher", str(checkpoint), *data, *training],
            "sft": ["sft", "--model_name_or_path", str(checkpoint), "--bf16", "false", *training],
        }[entry_point]
        assert main(argv) == 2
        assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists() and asked == []


def _recipe(checkpoint: Path, tmp_path: Path) -> Path:
    recipe = {
        "teacher": str(checkpoint),
        "output_dir": str(tmp_path / "pipeline"),
        "seq_length": 16,
        "max_train_samples": 4,
        "max_eval_samples": 2,
        "eval_tasks": "",
        "pruning": {
            "hidden_size": 16,
            "num_attention_heads": 2,
            "calibration_samples": 2,
            "calibration_seq_length": 16,
        },
        "distillation": {"max_steps": 1, "report_to": "none"},
    }
    path = tmp_path / "minitron.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
