#!/bin/bash
# the package's own option (not the probe): the default against quote_threshold=0 in one run
cd /work/main
while ! grep -q "== done3" runs/s52/quote_runs3.log; do sleep 20; done
B=".venv/bin/extended-mind bench"
O=docs/eval-forms/quote
M='emt emt[quote_threshold=0]'
for form in chat completion; do
  flags=""; [ $form = chat ] && flags="--chat --no-prefix"
  echo "== pair $form $(date +%T)"
  $B pair --lengths 2 10 --n 5 --methods $M --threads 2 $flags --no-progress --out $O/pair/$form 2>&1 | grep -E "^\| emt"
done
echo "== passkey-prose chat $(date +%T)"
$B passkey-prose --lengths 8192 16384 --depths 0.1 0.5 0.9 --n 1 --methods $M --threads 2 --chat --no-prefix --no-progress --out $O/passkey-prose/chat 2>&1 | grep -E "^\| emt"
echo "== done5 $(date +%T)"
