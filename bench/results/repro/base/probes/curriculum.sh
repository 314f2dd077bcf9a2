set -e
cd /work/run17
python -m mgpo_jax.repro.pretrain --out=/work/run17/cur1 --steps=800 --mix=1,0,0 --eval_every=200 --ring=6 --num_objects=1 > cur1.log 2>&1
python -m mgpo_jax.repro.pretrain --out=/work/run17/cur2 --init_dir=/work/run17/cur1/hf --learning_rate=1e-3 --steps=500 --mix=1,0,0 --eval_every=100 --ring=6 --num_objects=2 > cur2.log 2>&1
python gates_one.py /work/run17/cur2/hf 2 > cur2_gates.txt 2>&1
python -m mgpo_jax.repro.pretrain --out=/work/run17/cur4 --init_dir=/work/run17/cur2/hf --learning_rate=1e-3 --steps=500 --mix=1,0,0 --eval_every=100 --ring=6 --num_objects=4 > cur4.log 2>&1
python gates_one.py /work/run17/cur4/hf 4 > cur4_gates.txt 2>&1
