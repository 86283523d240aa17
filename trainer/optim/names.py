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
# CF-SGD step-size forms (trainer/optim/rules.py): FBGEMM's COUNTER_SGD, or the paper's fixed horizon
COUNTER_FORMS = ("fbgemm", "paper")
