"""Hub model ids (engine.hub, engine.models.resolve) and the model's own tokenizers, without network:
a Hugging Face cache laid out as huggingface_hub writes it (tests/hub_cache.py) with
HF_HUB_OFFLINE=1, and, for the Hub's own answers (a missing or gated repository), a local server that
answers as the Hub does, named by HF_ENDPOINT."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
from _cli import run_cli, run_cli_process
from hub_cache import QWEN_COMMIT, add_repo, preset_repo, use_cache

from engine import hub, models
from engine.errors import BadInput
from engine.profile import Profile

PINNED = ("method", "peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "breakdown",
          "params", "peak_batch_shape", "peak_phase")
OTHER_COMMIT = "a" * 40


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    home.mkdir()
    use_cache(monkeypatch, home)
    yield home
    hub._fetch.cache_clear()


def _one_line_exit_2(code, out, err):
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("headroom: error: "), err
    assert "Traceback" not in err + out


def test_a_hub_id_offline_gives_the_bundled_presets_numbers(tmp_path):
    """`headroom estimate --model Qwen/Qwen2.5-0.5B --json` in a child process with only HF_HOME and
    HF_HUB_OFFLINE set: the same numbers as the bundled preset of the same config.json."""
    home = tmp_path / "hf"
    preset_repo(home, "Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B")
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    # analytic: the traced estimator builds from the same config object (24 traced blocks take
    # ~15 s here, twice); what is under test is where the config and tokenizer come from.
    done = run_cli_process(["estimate", "--model", "Qwen/Qwen2.5-0.5B", "--json", "--method", "analytic"],
                           env=env | {"HF_HUB_CACHE": str(home / "hub")})
    assert done.returncode == 0, done.stderr
    from_hub = json.loads(done.stdout)
    code, out, err = run_cli(["estimate", "--model", "Qwen2.5-0.5B", "--json", "--method", "analytic"])
    assert code == 0, err
    preset = json.loads(out)
    assert {k: from_hub[k] for k in PINNED} == {k: preset[k] for k in PINNED}
    assert from_hub["params"] == 494_032_768
    assert from_hub["tokenizer"]["source"] == "model" and from_hub["tokenizer"]["model_kind"] == "hub"
    assert preset["tokenizer"]["source"] == "fallback"


def test_an_uncached_repo_offline_is_one_line(hf_home):
    code, out, err = run_cli(["estimate", "--model", "Qwen/Qwen2.5-0.5B"])
    _one_line_exit_2(code, out, err)
    assert "not in the local cache" in err and "HF_HUB_OFFLINE" in err and str(hf_home) in err


def test_a_revision_picks_its_snapshot(hf_home):
    preset_repo(hf_home, "org/tiny", "tiny-llama")  # main -> QWEN_COMMIT, 2 layers
    preset_repo(hf_home, "org/tiny", "tiny-llama", commit=OTHER_COMMIT, branch="wide",
                num_hidden_layers=3)
    layers = {}
    for name in ("org/tiny", f"org/tiny@{QWEN_COMMIT}", f"org/tiny@{OTHER_COMMIT}", "org/tiny@wide"):
        facts = models.model_facts(Profile(model=name, seq=64))
        assert facts.kind == "hub"
        layers[name] = (facts.layers, facts.hub_commit)
    assert layers["org/tiny"] == layers[f"org/tiny@{QWEN_COMMIT}"] == (2, QWEN_COMMIT)
    assert layers[f"org/tiny@{OTHER_COMMIT}"] == layers["org/tiny@wide"] == (3, OTHER_COMMIT)
    code, out, err = run_cli(["estimate", "--model", "org/tiny@nope", "--seq", "64"])
    _one_line_exit_2(code, out, err)
    assert "org/tiny@nope" in err


def test_the_safetensors_header_gives_count_and_dtypes(hf_home, tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(3, 5, dtype=torch.bfloat16), "b.bias": torch.zeros(7),
               "ids": torch.zeros(4, dtype=torch.int64)}, str(weights))
    snapshot = preset_repo(hf_home, "org/with-weights", "tiny-gpt2")
    add_repo(hf_home, "org/with-weights", {"model.safetensors": weights})
    code, out, err = run_cli(["inspect", "--model", "org/with-weights", "--seq", "64", "--json"])
    assert code == 0, err
    model = json.loads(out)["model"]
    assert model["checkpoint"] == {"params": 15 + 7 + 4, "dtypes": {"BF16": 15, "F32": 7, "I64": 4},
                                   "source": "cache"}
    # The cached weights are not what an estimate or a plain measure uses: random init, as a preset.
    assert model["has_weights"] is False
    assert (snapshot / "model.safetensors").is_file()


def test_without_weights_the_checkpoint_is_unknown_offline(hf_home):
    preset_repo(hf_home, "org/config-only", "tiny-gpt2")
    facts = models.model_facts(Profile(model="org/config-only", seq=64))
    assert facts.checkpoint is None and not facts.has_weights and facts.has_tokenizer


def test_an_existing_folder_wins_over_a_hub_id(hf_home, tmp_path, monkeypatch):
    preset_repo(hf_home, "org/tiny", "tiny-llama")
    local = tmp_path / "work" / "org" / "tiny"
    local.mkdir(parents=True)
    (local / "config.json").write_text((models.PRESET_DIR / "tiny-gpt2" / "config.json").read_text())
    monkeypatch.chdir(tmp_path / "work")
    assert models.source_kind("org/tiny") == "folder"
    assert models.resolve("org/tiny").kind == "folder"
    assert models.load_config("org/tiny").model_type == "gpt2"
    monkeypatch.chdir(tmp_path)
    assert models.source_kind("org/tiny") == "hub"
    assert models.load_config("org/tiny").model_type == "llama"


@pytest.mark.parametrize("name, kind", [
    ("Qwen/Qwen2.5-0.5B", "hub"), ("Qwen/Qwen2.5-0.5B@main", "hub"), ("org/name@refs/pr/1", "hub"),
    ("./Qwen/Qwen2.5-0.5B", "folder"), ("/abs/org/name", "folder"), ("~/org/name", "folder"),
    ("a/b/c", "folder"), ("org--x/name", "folder"), ("gpt2", "preset"), ("minilm", "minilm"),
    ("gpt-17", ""),
])
def test_what_a_name_means(name, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.source_kind(name) == kind


@pytest.mark.parametrize("name", ["org/name@", "org/name@../x", "org/name@a b", "org/name@x.lock"])
def test_a_broken_revision_is_one_line(name):
    with pytest.raises(BadInput, match="not a Hub revision"):
        models.resolve(name)
    code, out, err = run_cli(["estimate", "--model", name])
    _one_line_exit_2(code, out, err)


def test_a_hub_model_is_tokenized_with_its_own_tokenizer(hf_home):
    """A Hub repository with MiniLM's tokenizer.json: the dataset's lengths are MiniLM's, not the
    fallback's, and the results say so."""
    from transformers import AutoTokenizer

    from engine import data

    minilm = models.resolve("minilm").folder
    preset_repo(hf_home, "org/bert", "tiny-bert", tokenizer=minilm / "tokenizer.json", vocab_size=30522)
    profile = Profile(model="org/bert", seq=64, padding="dynamic", target="cpu", batch=2)
    texts = data.load_texts("builtin")[:200]
    own = AutoTokenizer.from_pretrained(str(minilm))
    expected = [len(x) for x in own(texts)["input_ids"]]
    got = [len(x) for x in data.tokenize(texts, data.tokenizer_for(profile))]
    assert got == expected
    assert got != [len(x) for x in data.tokenize(texts, data.fallback_tokenizer())]
    code, out, err = run_cli(["estimate", "--model", "org/bert", "--seq", "64", "--padding", "dynamic",
                              "--method", "analytic", "--json"])
    assert code == 0, err
    assert json.loads(out)["tokenizer"]["source"] == "model"


def test_minilm_is_tokenized_with_its_own_tokenizer_and_the_json_says_so(tmp_path):
    from transformers import AutoTokenizer

    from engine import data

    texts = [t.replace("\n", " ") for t in data.load_texts("builtin")[:300]]
    (tmp_path / "d.txt").write_text("\n".join(texts) + "\n")
    profile = Profile(model="minilm", seq=128, padding="dynamic", target="cpu")
    code, out, err = run_cli(["inspect", "--model", "minilm", "--seq", "128", "--dataset",
                              tmp_path / "d.txt", "--json"])
    assert code == 0, err
    stats = json.loads(out)["dataset"]
    own = AutoTokenizer.from_pretrained(str(models.resolve("minilm").folder))
    lengths = [len(x) for x in own(data.load_texts(str(tmp_path / "d.txt"), txt_mode="lines"))["input_ids"]]
    assert lengths != [len(x) for x in data.tokenize(texts, data.fallback_tokenizer())]
    assert stats["count"] == len(lengths) and stats["max"] == max(lengths)
    assert stats["mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert data.tokenizer_info(profile) == {"source": "model", "model_kind": "minilm",
                                            "name": "minilm's own tokenizer"}
    code, out, err = run_cli(["estimate", "--model", "minilm", "--seq", "128", "--padding", "dynamic",
                              "--method", "analytic", "--json"])
    assert code == 0, err
    assert json.loads(out)["tokenizer"]["source"] == "model"


def test_a_repos_tokenizer_code_never_runs(hf_home, tmp_path):
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast\n" \
           "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    preset_repo(hf_home, "org/evil", "tiny-gpt2")
    add_repo(hf_home, "org/evil", {
        "evilcode.py": code,
        "tokenizer_config.json": json.dumps({"tokenizer_class": "EvilTokenizer", "auto_map": {
            "AutoTokenizer": ["evilcode.EvilTokenizer", "evilcode.EvilTokenizer"]}})})
    profile = Profile(model="org/evil", seq=32, padding="dynamic", target="cpu", trust_remote_code=True)
    from engine import data, remote_code

    assert remote_code.model_folders(profile) == []  # nothing to grant: Hub code never runs
    tok = data.tokenizer_for(profile)
    assert len(tok("hello there")["input_ids"]) > 0
    assert not marker.exists()


def test_a_hub_config_that_needs_its_code_is_refused(hf_home):
    preset_repo(hf_home, "org/custom", "tiny-gpt2", model_type="evilarch",
                auto_map={"AutoConfig": "evil.Config"})
    code, out, err = run_cli(["estimate", "--model", "org/custom", "--trust-remote-code"])
    _one_line_exit_2(code, out, err)
    assert "never runs" in err


def test_real_weights_only_when_asked(hf_home, tmp_path):
    """A measured run of a Hub id is random init unless the profile asks for its weights; then the
    cached safetensors weights are what the model holds."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engine.data.tokens import FALLBACK_PATH

    config = json.loads((models.PRESET_DIR / "tiny-gpt2" / "config.json").read_text())
    saved = tmp_path / "saved"
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(models.load_config("tiny-gpt2"))
    reference.save_pretrained(saved, safe_serialization=True)
    tensors = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    add_repo(hf_home, "org/trained", {"config.json": json.dumps(config), "tokenizer.json": FALLBACK_PATH,
                                      "model.safetensors": tmp_path / "model.safetensors"})
    wte = reference.transformer.wte.weight
    random_init = models.build_model(Profile(model="org/trained", seq=32, target="cpu"), "cpu")
    assert not torch.equal(random_init.transformer.wte.weight, wte)
    loaded = models.build_model(Profile(model="org/trained", seq=32, target="cpu",
                                        download_weights=True), "cpu")
    assert torch.equal(loaded.transformer.wte.weight, wte)
    meta = models.build_model(Profile(model="org/trained", seq=32, download_weights=True), "meta")
    assert meta.transformer.wte.weight.is_meta


def test_weights_asked_for_but_only_pickles_is_one_line(hf_home):
    preset_repo(hf_home, "org/pickled", "tiny-gpt2")
    add_repo(hf_home, "org/pickled", {"pytorch_model.bin": b"not loaded"})
    code, out, err = run_cli(["measure", "--model", "org/pickled", "--target", "cpu", "--batch", "1",
                              "--seq", "8", "--steps", "1", "--download-weights"])
    _one_line_exit_2(code, out, err)
    assert "no safetensors weights" in err


# ----- the Hub's own answers, from a local server (no network) -------------------------------------
class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers the model-info call as huggingface.co does: 404 RepoNotFound, 403 GatedRepo."""

    seen_auth: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _FakeHub.seen_auth.append(self.headers.get("Authorization", ""))
        if "/gated" in self.path:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model org/gated is restricted.")
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "no"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def online_hub(hf_home, monkeypatch):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "no-token"))
    yield endpoint
    server.shutdown()


@pytest.mark.parametrize("repo, words", [
    ("nobody/missing", "not found"),
    ("org/gated", "is gated"),
])
def test_missing_and_gated_repos_are_one_line(online_hub, repo, words):
    code, out, err = run_cli(["estimate", "--model", repo])
    _one_line_exit_2(code, out, err)
    assert words in err and repo in err


def test_hf_token_is_sent(online_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_headroomtest")
    monkeypatch.setattr(constants, "HF_TOKEN", "hf_headroomtest", raising=False)
    _FakeHub.seen_auth.clear()
    code, out, err = run_cli(["estimate", "--model", "org/gated"])
    _one_line_exit_2(code, out, err)
    assert "Bearer hf_headroomtest" in _FakeHub.seen_auth


def test_no_network_is_one_line(hf_home, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused
    code, out, err = run_cli(["estimate", "--model", "org/anything"])
    _one_line_exit_2(code, out, err)
    assert "cannot reach the Hugging Face Hub" in err


# ----- export ------------------------------------------------------------------------------------
def test_the_exported_script_fetches_config_and_tokenizer_by_hub_id(hf_home, tmp_path):
    """A Hub id's script names the repository and the planned commit, loads config and tokenizer
    from there (no embedded fallback, no path into the cache), runs offline from the same cache,
    and tokenizes as the engine does."""
    import runpy
    import subprocess
    import sys

    from engine import data
    from engine.export import export_script

    minilm = models.resolve("minilm").folder
    preset_repo(hf_home, "org/bert", "tiny-bert", tokenizer=minilm / "tokenizer.json", vocab_size=30522)
    corpus = tmp_path / "d.txt"  # a few lines: the script's built-in corpus takes seconds to build
    corpus.write_text("\n".join(f"line {i} of a small corpus for the exported script" for i in range(40)))
    profile = Profile(model="org/bert", seq=32, batch=2, target="cpu", steps=2, dataset=str(corpus))
    text = export_script(profile)
    assert 'MODEL_ID = "org/bert"' in text and f'MODEL_REVISION = "{QWEN_COMMIT}"' in text
    assert "AutoConfig.from_pretrained(MODEL_ID, revision=MODEL_REVISION)" in text
    assert "load_model_tokenizer(MODEL_ID, MODEL_REVISION, local_files_only=False)" in text
    assert "FALLBACK_TOKENIZER_XZ" not in text and str(hf_home) not in text
    assert "trust_remote_code=True" not in text
    path = tmp_path / "train.py"
    path.write_text(text)
    script = runpy.run_path(str(path), run_name="exported")
    sample = ["Hub ids fetch only config and tokenizer.", "ünïcode and digits 12345"]
    assert script["load_tokenizer"]()(sample)["input_ids"] == data.tokenizer_for(profile)(sample)["input_ids"]
    import os

    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(path), "--device", "cpu"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["params"] == models.model_facts(profile).params and result["steps"] == 2


def test_a_preset_script_embeds_the_fallback_through_the_engines_loader(tmp_path):
    import inspect
    import textwrap

    from engine.data import tokens
    from engine.export import export_script

    text = export_script(Profile(model="tiny-gpt2", seq=32, batch=2, target="cpu"))
    assert textwrap.dedent(inspect.getsource(tokens.tokenizer_from_json)).strip() in text
    assert "FALLBACK_TOKENIZER_XZ" in text and "load_model_tokenizer" not in text


def test_a_hub_script_with_weights_asks_the_hub_for_them(hf_home):
    from engine.export import export_script

    preset_repo(hf_home, "org/tiny", "tiny-llama")
    text = export_script(Profile(model="org/tiny", seq=32, batch=2, target="cpu", download_weights=True))
    assert "MODEL_ID, revision=MODEL_REVISION, config=config, use_safetensors=True" in text
    assert "from_config(" not in text.split("def build_model", 1)[1].split("\ndef ", 1)[0]


# ----- the app's model search box ----------------------------------------------------------------
def test_the_search_box_takes_a_hub_id_and_the_panel_says_what_it_is(qtbot, hf_home):
    pytest.importorskip("PySide6")
    from PySide6.QtCore import Qt

    from app.state import AppState
    from app.widgets import model_panel

    preset_repo(hf_home, "org/tiny", "tiny-llama")
    state = AppState([Profile(name="p", model="tiny-gpt2", target="cpu", seq=64)], autosave=False)
    panel = model_panel.ModelPanel(state)
    qtbot.addWidget(panel)
    try:
        qtbot.keyClicks(panel.search, "org/tiny")
        assert panel.visible_presets() == [] and not panel.hub_hint.isHidden()
        assert "Hub model org/tiny" in panel.hub_hint.text()
        with qtbot.waitSignal(panel.facts_changed, timeout=30000,
                              check_params_cb=lambda f: f is not None and f.kind == "hub"):
            qtbot.keyClick(panel.search, Qt.Key.Key_Return)
        assert state.profile.model == "org/tiny"
        text = panel.facts.text()
        assert "Hub model @060db649" in text and "its own tokenizer" in text
        assert not panel.download_weights.isHidden() and panel.trust_code.isHidden()
        panel.download_weights.setChecked(True)
        assert state.profile.download_weights is True
        with qtbot.waitSignal(panel.facts_changed, timeout=30000, check_params_cb=lambda f: f is not None):
            state.update(model="tiny-gpt2", download_weights=False)
        assert "fallback tokenizer" in panel.facts.text() and panel.download_weights.isHidden()
    finally:
        panel.shutdown()


class _WeightsHub(http.server.BaseHTTPRequestHandler):
    """Serves one repository's model.safetensors as the Hub's resolve endpoint does (HEAD with its
    metadata, GET honouring Range); records the byte ranges it sent."""

    payload = b""
    sent: list[int] = []

    def _head(self, status, length=0):
        self.send_response(status)
        if status >= 400:
            self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("ETag", '"abc123"')
        self.send_header("X-Repo-Commit", QWEN_COMMIT)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        if self.path.endswith("/model.safetensors"):
            self._head(200, len(self.payload))
        else:
            self._head(404)

    def do_GET(self):  # noqa: N802
        if not self.path.endswith("/model.safetensors"):
            self._head(404)
            return
        start, end = 0, len(self.payload) - 1
        if self.headers.get("Range"):
            first, last = self.headers["Range"].split("=")[1].split("-")
            start, end = int(first), min(int(last), end)
        body = self.payload[start:end + 1]
        _WeightsHub.sent.append(len(body))
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_online_the_count_comes_from_a_ranged_read_of_the_header(hf_home, tmp_path, monkeypatch):
    """Online, a snapshot without weights gets its count and dtypes from get_safetensors_metadata's
    ranged reads: the bytes sent are the header's first 100 kB, never the 4 MB of weights."""
    import torch
    from huggingface_hub import constants
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1024, 1024), "b": torch.zeros(8, dtype=torch.float16)},
              str(tmp_path / "model.safetensors"))
    _WeightsHub.payload = (tmp_path / "model.safetensors").read_bytes()
    _WeightsHub.sent = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WeightsHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        preset_repo(hf_home, "org/weights", "tiny-gpt2")
        snapshot = hub.fetch(hub.parse("org/weights"))  # offline: from the cache
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        from huggingface_hub import hf_api

        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        # The module-level HfApi (made at import) answers get_safetensors_metadata; hf_hub_url swaps
        # the default endpoint for its own.
        monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
        hub._remote_checkpoint_facts.cache_clear()
        facts = hub.checkpoint_facts(snapshot)
    finally:
        server.shutdown()
        hub._remote_checkpoint_facts.cache_clear()
    assert facts == hub.CheckpointFacts(1024 * 1024 + 8, {"F16": 8, "F32": 1024 * 1024}, "hub")
    assert _WeightsHub.sent and sum(_WeightsHub.sent) <= 100_001 < len(_WeightsHub.payload)
    assert not (snapshot.folder / "model.safetensors").exists()  # nothing was downloaded
