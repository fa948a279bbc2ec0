#!/bin/bash
cd /work/main
while ! grep -q "== done" runs/s52/quote_runs.log; do sleep 20; done
export PYTHONPATH=/tmp/frozen/src
P=".venv/bin/python runs/s52/quote_probe.py bench"
O=runs/s52/quote
run() { name=$1; task=$2; shift 2; for form in chat completion; do
  flags=""; [ $form = chat ] && flags="--chat --no-prefix"
  [ -f $O/$name/$form/results.json ] && continue
  echo "== $name $form $(date +%T)"
  $P $task "$@" --threads 2 $flags --no-progress --out $O/$name/$form 2>&1 | grep -E "QUOTE|CHANGE|^\| emt|^\| none" ; done; }
run passkey passkey --lengths 8192 16384 --depths 0.1 0.5 0.9 --n 1 --methods emt
echo "== done2 $(date +%T)"
