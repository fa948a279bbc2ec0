#!/bin/bash
cd /work/main
while ! grep -q "== done2" runs/s52/quote_runs2.log; do sleep 20; done
export PYTHONPATH=/tmp/frozen/src
M=$(.venv/bin/python scripts/fetch_gemma3.py 2>/dev/null | tail -1)
echo "model $M $(date +%T)"
P=".venv/bin/python runs/s52/quote_probe.py bench"
O=runs/s52/quote/gemma3
echo "== gemma passkey-prose $(date +%T)"
$P passkey-prose --model $M --lengths 8192 --depths 0.1 0.5 0.9 --n 1 --methods emt --threads 2 --no-progress --out $O/passkey-prose 2>&1 | grep -E "QUOTE|CHANGE|^\| emt"
echo "== gemma general $(date +%T)"
$P general --model $M --lengths 15000 --n 40 --methods emt none --threads 2 --no-progress --out $O/general 2>&1 | grep -E "QUOTE|CHANGE|^\| emt|^\| none"
echo "== done3 $(date +%T)"
