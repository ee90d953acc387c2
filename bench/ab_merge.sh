#!/usr/bin/env bash
# A/B of `patchctl merge --apply` between two checkouts on one pushed registry, interleaved.
#
#   bash bench/ab_merge.sh OLD_REV [ROUNDS]
#
# OLD_REV is checked out with `git worktree` under /tmp/patchctl-ab-old and run through a
# throwaway interpreter prefix whose path lists that checkout before this venv's site-packages
# (the editable install's import hook would otherwise win). Inputs: the 99M-parameter synthetic
# Llama of bench/merge.py (`python bench/merge.py --layers 2` builds bench/_work/llama-l2-*).
# Prints one line per run: round, old|new, method, wall seconds, exit code, merged digest.
set -u
REV=${1:?usage: bash bench/ab_merge.sh OLD_REV [ROUNDS]}
ROUNDS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
W=$HERE/bench/_work
OLDTREE=/tmp/patchctl-ab-old
OLDPFX=/tmp/patchctl-ab-oldvenv
REG=$(mktemp -d)/reg
NEW=$HERE/.venv/bin/patchctl
SITE=$("$HERE/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -d "$OLDTREE" ]; then git -C "$HERE" worktree add -q "$OLDTREE" "$REV"; fi
cp "$HERE"/patchctl/_kernels*.so "$OLDTREE/patchctl/" 2>/dev/null || true
mkdir -p "$OLDPFX/bin" "$OLDPFX/lib/python3.11/site-packages"
cp "$HERE/.venv/pyvenv.cfg" "$OLDPFX/"
ln -sf "$(readlink -f "$HERE/.venv/bin/python")" "$OLDPFX/bin/python"
printf '%s\n%s\n' "$OLDTREE" "$SITE" > "$OLDPFX/lib/python3.11/site-packages/old.pth"
printf '#!%s\nimport sys\nfrom patchctl.cli.main import main\nsys.exit(main())\n' "$OLDPFX/bin/python" > "$OLDPFX/bin/patchctl"
chmod +x "$OLDPFX/bin/patchctl"
OLD=$OLDPFX/bin/patchctl
cd /tmp
for k in dense sparse lowrank; do $NEW push "$W/llama-l2-ft-$k" "ft-$k:v1" --base "$W/llama-l2-base" -R "$REG" >/dev/null; done
for round in $(seq "$ROUNDS"); do
  for who in old new; do
    EXE=$OLD; [ $who = new ] && EXE=$NEW
    for m in task_arithmetic ties; do
      extra=""; [ $m = ties ] && extra="--density 0.2"
      out=$(mktemp -d)/model; log=$(mktemp)
      s=$(date +%s.%N)
      $EXE merge ft-dense:v1 ft-sparse:v1 ft-lowrank:v1 --weights 0.5,0.3,0.2 --method $m $extra \
        --as "m-$who-$m:r$round" --no-validate -R "$REG" --apply "$out" --base "$W/llama-l2-base" > "$log" 2>&1
      rc=$?; e=$(date +%s.%N)
      echo "$round $who $m $(echo "$e - $s" | bc) rc=$rc $(grep -o 'sha256:[0-9a-f]\{12\}' "$log" | head -1)"
      rm -rf "$(dirname "$out")" "$log"
    done
  done
done
