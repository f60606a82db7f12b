#!/usr/bin/env bash
# Does Headroom work as an installed package, away from its checkout? Builds the wheel (through an
# sdist, as `python -m build` does: what the sdist lacks, the wheel lacks too), installs it into a
# fresh venv in /tmp (torch==2.13.0 first, as scripts/bootstrap.sh does), and from a folder where
# the checkout is on no path runs estimate, a CPU measure (in-process and in the app's child
# process), export, the exported script copied to yet another folder, and the app offscreen.
#   bash scripts/check_wheel.sh        # CI runs it after the tests
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
work="$(mktemp -d /tmp/headroom-wheel.XXXXXX)"
trap 'rm -rf "$work"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
started=$SECONDS
step() { echo "check_wheel [$((SECONDS - started)) s]: $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
# pip's chatter (this machine's extra indexes warn once per package) goes to a log, shown on failure.
pip_q() { "$V/python" -m pip install -q "$@" 2>>"$work/pip.log" || { cat "$work/pip.log" >&2; return 1; }; }

step "venv in $work"
"$PY" -m venv "$work/venv"
V="$work/venv/bin"
pip_q torch==2.13.0 || pip_q torch
pip_q build

step "building the sdist and the wheel"
"$V/python" -m build -q --outdir "$work/dist" "$repo" >>"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; fail "build"; }
wheel=("$work"/dist/headroom-*.whl)
[ -f "${wheel[0]}" ] || fail "no wheel built"
"$V/python" - "${wheel[0]}" <<'EOF' || fail "the wheel lacks package data"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["engine/resources/tokenizer/fallback.json", "engine/resources/models/tiny-gpt2/config.json",
        "engine/resources/models/gpt2/config.json", "engine/__main__.py", "app/launch.py"]
missing = [n for n in need if n not in names]
assert not missing, missing
EOF

step "installing the wheel"
pip_q "${wheel[0]}" || fail "installing the wheel"

# Nothing of the checkout on any path: a foreign cwd, no PYTHONPATH, caches and settings in /tmp.
run="$work/run"
mkdir -p "$run" "$work/elsewhere"
cd "$run"
unset PYTHONPATH
export HOME="$work/home" XDG_CACHE_HOME="$work/cache" HEADROOM_SETTINGS_DIR="$work/settings"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false QT_QPA_PLATFORM=offscreen
mkdir -p "$HOME"
"$V/python" -c '
import sys, engine, app
for mod in (engine, app):
    assert "site-packages" in mod.__file__ and not mod.__file__.startswith(sys.argv[1]), mod.__file__
' "$repo" || fail "engine/app are not imported from the installed wheel"

# json_has FILE KEY...: the last JSON line of FILE has every KEY, and a positive peak.
json_has() {
  "$V/python" - "$@" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8") if l.startswith("{")]
assert lines, f"no JSON line in {sys.argv[1]}"
out = json.loads(lines[-1])
missing = [k for k in sys.argv[2:] if k not in out]
assert not missing, f"{sys.argv[1]}: missing {missing}"
assert out["peak_allocated_bytes"] > 0, out["peak_allocated_bytes"]
EOF
}

step "headroom estimate"
"$V/headroom" estimate --model tiny-gpt2 --json > estimate.json || fail "estimate"
json_has estimate.json breakdown peak_reserved_bytes headroom_version || fail "estimate's JSON"

step "headroom measure --target cpu"
"$V/headroom" measure --model tiny-gpt2 --target cpu --steps 2 --seq 32 --batch 2 --json > measure.json \
  || fail "measure"
json_has measure.json real_tokens padded_tokens tokens_per_s headroom_version || fail "measure's JSON"

step "measure in a child process (the app's Run)"
"$V/python" -c '
from engine.measure import measure_in_child
from engine.profile import Profile
r = measure_in_child(Profile(model="tiny-llama", target="cpu", steps=2, seq=32, batch=2))
assert r.peak_allocated_bytes > 0, r
' || fail "measure_in_child"

step "headroom export"
"$V/headroom" export --model tiny-gpt2 --target cpu --batch 2 --seq 32 -o train.py || fail "export"
for place in "$repo" "$work/venv" site-packages/engine; do
  if grep -qF "$place" train.py; then fail "train.py names $place"; fi
done
cp train.py "$work/elsewhere/"
(cd "$work/elsewhere" && "$V/python" train.py --device cpu --steps 2 > out.txt) || fail "train.py"
json_has "$work/elsewhere/out.txt" peak_reserved_bytes tokens_per_s losses || fail "train.py's JSON"

step "the app, offscreen"
"$V/headroom" --smoke || fail "headroom --smoke"

step "passed"
