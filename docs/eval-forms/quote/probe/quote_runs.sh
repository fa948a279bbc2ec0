#!/bin/bash
# the quote-continuation probe over the harness tasks, both forms, from a frozen copy of the source
cd /work/main
export PYTHONPATH=/tmp/frozen/src
P=".venv/bin/python runs/s52/quote_probe.py bench"
O=runs/s52/quote
run() { name=$1; task=$2; shift 2; for form in chat completion; do
  flags=""; [ $form = chat ] && flags="--chat --no-prefix"
  [ -f $O/$name/$form/results.json ] && continue
  echo "== $name $form $(date +%T)"
  $P $task "$@" --threads 2 $flags --no-progress --out $O/$name/$form 2>&1 | grep -E "QUOTE|CHANGE|^\| emt|^\| none" ; done; }
run passkey-prose passkey-prose --lengths 8192 16384 32768 --depths 0.1 0.5 0.9 --n 1 --methods emt
run niah niah --lengths 2048 --depths 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --n 2 --methods emt
run wikiqa wikiqa --lengths 2048 --n 6 --methods emt
run pair pair --lengths 2 10 --n 5 --methods emt
run niah-8k niah --lengths 8192 --depths 0.1 0.5 0.9 --n 1 --methods emt
run general-lists general-lists --lengths 15000 --n 40 --methods emt none
run general general --lengths 15000 --n 40 --methods emt none
run passkey passkey --lengths 8192 16384 --depths 0.1 0.5 0.9 --n 1 --methods emt  # (run next, by a second script)
echo "== done $(date +%T)"
