#!/usr/bin/env bash
# Train and sample every paper script, one after another, then write a gallery page
# (runs/all-MODE/index.html) of the samples with the wall time, steps and digit scores of each.
#   ./run_all.sh            each script's defaults (the gpu preset on a GPU, the cpu preset on a CPU)
#   ./run_all.sh --cpu      each script's CPU configuration (--preset cpu): a benchmark, not a test
#   ./run_all.sh --quick    a seconds-long pass of each (--preset tiny): does everything run?
# Other arguments go to every script:  ./run_all.sh --cpu --data-dir ../shared/data
# Scores come from ../shared/tools/digit_score.py when it is there (a development aid).
set -uo pipefail
cd "$(dirname "$0")"
mode=default
preset=()
case "${1:-}" in
  --cpu) mode=cpu; preset=(--preset cpu); shift ;;
  --quick) mode=quick; preset=(--preset tiny); shift ;;
esac
py=${PYTHON:-python}
root="runs/all-$mode"
mkdir -p "$root"
rows=""
for script in image/*.py video/*.py; do
  [ -f "$script" ] || continue
  name=$(basename "$script" .py)
  out="$root/$name"
  rm -rf "$out"
  start=$(date +%s)
  if "$py" "$script" --train --sample "${preset[@]}" --out "$out" "$@" > "$root/$name.log" 2>&1; then
    status=ok
  else
    status="failed, see $name.log"
  fi
  secs=$(( $(date +%s) - start ))
  steps=$(grep -o '^step [0-9]*' "$out/log.txt" 2>/dev/null | tail -1 | cut -d' ' -f2)
  score=""
  if [ "$mode" != quick ] && [ -f ../shared/tools/digit_score.py ] && [ -f "$out/samples.npz" ]; then
    score=$("$py" ../shared/tools/digit_score.py "$out/samples.npz" 2>/dev/null | tail -n 1)
  fi
  echo "$script: $status, $((secs / 60))m$((secs % 60))s, ${steps:-?} steps $score"
  rows+="<tr><td>$script</td><td>$status</td><td>$((secs / 60))m$((secs % 60))s</td><td>${steps:-?}</td>"
  rows+="<td><code>$score</code></td><td><img src=\"$name/samples.png\" width=256></td></tr>"$'\n'
done
cat > "$root/index.html" <<HTML
<!doctype html><meta charset="utf-8"><title>xdiffusion gallery: $mode</title>
<h1>xdiffusion gallery: $mode run, $(date -u '+%F %H:%M') UTC, $(nproc) CPU cores$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^/, /')</h1>
<table border=1 cellpadding=4>
<tr><th>script</th><th>status</th><th>wall time</th><th>steps</th><th>digit score</th><th>samples</th></tr>
$rows</table>
HTML
echo "gallery: $root/index.html"
