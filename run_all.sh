#!/usr/bin/env bash
# Train and sample every paper script, one after another, then write a gallery page
# (runs/all-MODE/index.html) of the samples with the wall time, steps and digit scores of each.
#   ./run_all.sh            each script's defaults (the gpu preset on a GPU, the cpu preset on a CPU)
#   ./run_all.sh --cpu      each script's CPU configuration (--preset cpu): a benchmark, not a test
#   ./run_all.sh --quick    a seconds-long pass of each (--preset tiny): does everything run?
#   ./run_all.sh --cpu --only sd3,flux    just these scripts; the gallery keeps the other scripts'
#                           latest results, so a long benchmark can be run in parts
# Other arguments go to every script:  ./run_all.sh --cpu --data-dir ../shared/data
# Scores come from ../shared/tools/digit_score.py when it is there (a development aid), on the run's own
# samples; SCORE_SAMPLES=1000 ./run_all.sh ... scores that many extra samples instead, drawn after the
# timed run (image scripts only: 100 samples overstate fd, whose real-vs-real floor is ~6 at 1000).
set -uo pipefail
cd "$(dirname "$0")"
mode=default
preset=()
only=""
case "${1:-}" in
  --cpu) mode=cpu; preset=(--preset cpu); shift ;;
  --quick) mode=quick; preset=(--preset tiny); shift ;;
esac
if [ "${1:-}" = --only ]; then
  only=",${2:?--only needs a comma-separated list of script names},"; shift 2
  for name in ${only//,/ }; do
    [ -f "image/$name.py" ] || [ -f "video/$name.py" ] || { echo "run_all.sh: no script image/$name.py or video/$name.py" >&2; exit 2; }
  done
fi
py=${PYTHON:-python}
# glibc hands every freed buffer over its threshold back to the OS; sampling (no autograd) frees each
# activation right after use, so on a CPU it spent about half its time in the kernel remapping pages.
# Keeping up to 1 GB makes CPU sampling about 2x faster (measured: VDM's 20 clips). Ignored off glibc.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-1073741824} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-1073741824}
root="runs/all-$mode"
mkdir -p "$root"
machine="$(nproc --all) CPU cores$(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^/, /')"
for script in image/*.py video/*.py; do
  [ -f "$script" ] || continue
  name=$(basename "$script" .py)
  [ -z "$only" ] || [[ "$only" == *",$name,"* ]] || continue
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
  scored="$out"
  if [ -n "${SCORE_SAMPLES:-}" ] && [[ "$script" == image/* ]] && [ "$mode" != quick ] && [ -f "$out/ckpt.pt" ]; then
    "$py" "$script" --sample "${preset[@]}" --ckpt "$out/ckpt.pt" --num-samples "$SCORE_SAMPLES" --out "$out/score" \
      "$@" >> "$root/$name.log" 2>&1 && scored="$out/score"
  fi
  if [ "$mode" != quick ] && [ -f ../shared/tools/digit_score.py ] && [ -f "$scored/samples.npz" ]; then
    score=$("$py" ../shared/tools/digit_score.py "$scored/samples.npz" 2>/dev/null | tail -n 1)
  fi
  echo "$script: $status, $((secs / 60))m$((secs % 60))s, ${steps:-?} steps $score"
  # one row per script, kept between runs: index.html gathers the latest row of every script
  echo "<tr><td>$script</td><td>$status</td><td>$((secs / 60))m$((secs % 60))s</td><td>${steps:-?}</td>\
<td><code>$score</code></td><td>$(date -u '+%F %H:%M') UTC, $machine</td><td><img src=\"$name/samples.png\" width=256></td></tr>" \
    > "$root/$name.row"
done
cat > "$root/index.html" <<HTML
<!doctype html><meta charset="utf-8"><title>xdiffusion gallery: $mode</title>
<h1>xdiffusion gallery: $mode run</h1>
<table border=1 cellpadding=4>
<tr><th>script</th><th>status</th><th>wall time</th><th>steps</th><th>digit score</th><th>run</th><th>samples</th></tr>
$(for script in image/*.py video/*.py; do cat "$root/$(basename "$script" .py).row" 2>/dev/null; done)
</table>
HTML
echo "gallery: $root/index.html"
