# edpo: preference optimisation with adaptive KL control. `just` lists the recipes.

# List the recipes.
[group('help')]
default:
    @just --list

# Run the default grid (the ε-ablation on the sentiment task), its report, and print its table.
[group('experiments')]
sweep grid="experiments/default.yaml" jobs="2":
    cargo run -p edpo -- sweep {{grid}} --jobs {{jobs}}

# Train one config, e.g. `just train experiments/synthetic.yaml --set objective.beta=0.2`.
[group('experiments')]
train config="experiments/synthetic.yaml" *args="":
    cargo run -p edpo -- train {{config}} {{args}}

# Hand a grid to Slurm as one job array, e.g. `just sweep-slurm experiments/default.yaml --time 01:00:00`.
[group('experiments')]
sweep-slurm grid="experiments/default.yaml" *args="":
    cargo build -p edpo
    target/debug/edpo sweep {{grid}} --launcher slurm {{args}}

# Where every run of a sweep is (pending / running / completed / failed).
[group('experiments')]
status sweep="runs/default":
    cargo run -p edpo -- sweep status {{sweep}}

# Start a single-node Slurm on this machine (root; what the Slurm tests run against).
[group('dev')]
slurm-up:
    tools/slurm/cluster.sh start

# Stop it.
[group('dev')]
slurm-down:
    tools/slurm/cluster.sh stop

# Show the runs a grid expands to, without running them.
[group('experiments')]
plan grid="experiments/synthetic-ablation.yaml":
    cargo run -p edpo -- sweep {{grid}} --dry-run

# The CI smoke grid.
[group('experiments')]
smoke:
    cargo run -p edpo -- sweep experiments/smoke.yaml --jobs 2

# The fixed training benchmark (prints JSON).
[group('performance')]
bench threads="1" steps="20":
    cargo run -p edpo -- bench --threads {{threads}} --steps {{steps}}

# The same workload in PyTorch (bare loop, same-FLOPs loop eager and compiled, TRL); needs
# torch, transformers, peft, trl, datasets. `just bench-torch 1 3 smollm2` for SmolLM2's size.
[group('performance')]
bench-torch threads="1" steps="20" workload="gpt2":
    python3 tools/bench_vs_torch.py --threads {{threads}} --steps {{steps}} --workload {{workload}}

# edpo and every PyTorch peer in one sitting, ROUNDS times alternating, as Markdown tables
# (records appended to OUT).
[group('performance')]
bench-sitting out="bench-sitting.jsonl" steps="2" rounds="3":
    cargo build -p edpo
    python3 tools/bench_sitting.py --edpo target/debug/edpo --steps {{steps}} --rounds {{rounds}} --out {{out}}

# Sweep --jobs 1 vs 2 and run threads 1 vs 2, as a Markdown table.
[group('performance')]
parallelism:
    cargo build -p edpo
    tools/measure_parallelism.sh

# The test suite (the README's test command).
[group('dev')]
test:
    cargo test --workspace

# Regenerate the PyTorch golden values (needs torch, transformers).
[group('dev')]
golden:
    python3 tools/make_golden.py
    python3 tools/make_objective_golden.py

# Exactly what CI runs.
[group('dev')]
ci:
    bash .ci/run
