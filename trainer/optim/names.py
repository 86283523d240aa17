"""The one list of embedding-optimizer names (config validation, sharding and the kernels read it).

Kept free of torch / FBGEMM imports so that loading a config stays cheap.
"""
# ours: step-size rules of our fused kernel (trainer/optim/rules.py), optionally with item-wise lexico
STEP_RULES = (
    "cfsgd",                  # CF-SGD step size from per-row counters
    "rowwise_adagrad",        # rowwise-Adagrad step size (the lexico ablation's reference)
)
# FBGEMM's fused optimizers (trainer/optim/fbgemm.py)
FBGEMM_OPTIMIZERS = (
    "exact_sgd",              # plain SGD
    "exact_adagrad",          # per-coordinate Adagrad
    "exact_rowwise_adagrad",  # rowwise Adagrad
    "counter_sgd",            # rowwise Adagrad + counter, LearningRateMode.COUNTER_SGD
)
# plain nn.Parameter + torch Adam (the papers' baseline; small tables only)
DENSE_OPTIMIZERS = ("dense_adam",)
EMB_OPTIMIZERS = FBGEMM_OPTIMIZERS + DENSE_OPTIMIZERS + STEP_RULES
# Learning rate each embedding optimizer gets when the config leaves ``lr`` unset: a user who switches
# ``embedding.optimizer.name`` alone gets a step size chosen for that rule (tuned on our data; see
# reports/quality/README.md for the studies), not the previous optimizer's.
DEFAULT_LR = {
    "exact_sgd": 10.0,
    "exact_adagrad": 0.05,
    "exact_rowwise_adagrad": 0.05,
    "counter_sgd": 3.0,
    "dense_adam": 1e-3,
    "cfsgd": 0.05,            # with its default ub_mode="table" (scale-free, like Adagrad's lr)
    "rowwise_adagrad": 0.05,
}
# CF-SGD step-size forms (trainer/optim/rules.py): FBGEMM's COUNTER_SGD, or the paper's fixed horizon
COUNTER_FORMS = ("fbgemm", "paper")
# CF-SGD gradient-scale prior ub: FBGEMM's fixed adjustment_ub, or our per-table online estimate
UB_MODES = ("fixed", "table")
# how the rows of one step are averaged into the table's estimate (rules.table_ub_update)
UB_ROWS = ("arithmetic", "geometric")
# per-row CF-SGD counter width in bytes: float32 count, or an approximate counter's level (int16, uint8)
COUNTER_BYTES = (4, 2, 1)
