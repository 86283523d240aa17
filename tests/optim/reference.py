"""Independent float64 references of the update rules, written row by row from the papers' formulas
(docs/ALGORITHMS.md §1-3): no code of trainer/optim is used, so rules.py, the torch path, the C++ op and
the Triton kernels are all checked against the formulas, not against each other."""
import math

def ref_counter(c, last, step, hl):
    if hl < 0:
        return c + 1, last
    if hl == 0:
        return 1.0, last
    delta = step - last if last > 0 else 1
    return 1.0 + 2.0 ** (-delta / hl) * c, step


def ref_counter_hash(row, step):
    """The compact counter's coin (docs/ALGORITHMS.md §1): a 32-bit hash of (table-global row, step)."""
    m = 0xFFFFFFFF
    x = ((row & m) * 0x27D4EB2D + (step & m)) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & m
    return x ^ (x >> 16)


def ref_compact_counter(level, row, step, counter_bytes):
    """Morris's approximate counter with base b = 2^(1/R): raise the level k with probability b^-k (the coin
    u = (hash >> 8) / 2^24 below b^-k, up to the largest level); the estimated count is (b^k - 1)/(b - 1)."""
    kmax, r = {2: (32767, 1024), 1: (255, 8)}[counter_bytes]
    u = (ref_counter_hash(row, step) >> 8) / 2.0 ** 24
    if level < kmax and u < 2.0 ** (-level / r):
        level += 1
    return level, (2.0 ** (level / r) - 1.0) / (2.0 ** (1.0 / r) - 1.0)


def ref_lexico_row(g, h, has_h, loss, alpha, lmax, h_clip, apply_to_all):
    """Returns (direction list, lambda) for one row."""
    gg = sum(x * x for x in g)
    if gg == 0:
        return [0.0] * len(g), 0.0
    if not has_h:
        if not apply_to_all:
            return list(g), 1.0
        h = [0.0] * len(g)
    if h_clip > 0:
        hn = math.sqrt(sum(x * x for x in h))
        cap = h_clip * math.sqrt(gg)
        if hn > cap:
            h = [x * cap / hn for x in h]
    phi = alpha * min(gg, max(loss, 0.0))
    lam = (phi - sum(a * b for a, b in zip(h, g))) / gg
    lam = min(max(lam, 0.0), lmax)
    return [a + lam * b for a, b in zip(h, g)], lam


def ref_direction(cfg, g_i, h_i, has_h_i, loss):
    """(direction, lambda or None) of one row: Algorithm 1 with lexico, else g (+ h: the plain "+T" sum)."""
    if cfg.lexico:
        return ref_lexico_row(g_i, h_i if h_i is not None else [0.0] * len(g_i), bool(has_h_i), loss,
                              cfg.lexico_alpha, cfg.lexico_lambda_max, cfg.lexico_h_clip, cfg.lexico_apply_to_all)
    return [a + (h_i[k] if h_i is not None else 0.0) for k, a in enumerate(g_i)], None


def ref_step(cfg, w, g, st, step, h=None, has_h=None, loss=None, table=None, rows=None):
    """Per-row loop over the rows of one table. st: dict of python lists; table: dict with the table's
    ub_sum / ub_count (ub_mode="table"), updated in place; rows: the rows' indices in the whole table
    (compact counters hash them). Returns new w (list of lists), st, lams."""
    n = len(w)
    dirs = [ref_direction(cfg, g[i], h[i] if h is not None else None, has_h[i] if has_h is not None else False,
                          loss) for i in range(n)]
    lams = [lam for _, lam in dirs] if cfg.lexico else []
    ub = cfg.adjustment_ub
    if getattr(cfg, "ub_mode", "fixed") == "table" and cfg.step_rule == "cfsgd":
        # ours: ub = adjustment_ub x (mean over the table's steps of x_t), x_t = mean_rows mean_d d^2
        per_row = [sum(x * x for x in d) / len(d) for d, _ in dirs]
        if getattr(cfg, "ub_rows", "arithmetic") == "geometric":
            logs = [math.log(m) for m in per_row if m > 0]
            if logs:
                table["ub_sum"] += math.exp(sum(logs) / len(logs))
                table["ub_count"] += 1
        elif n:
            table["ub_sum"] += sum(per_row) / n
            table["ub_count"] += 1
        ub = cfg.adjustment_ub * table["ub_sum"] / max(table["ub_count"], 1)
    out = []
    for i in range(n):
        d = dirs[i][0]
        ub_i = max(ub, sum(x * x for x in d) / len(d)) if getattr(cfg, "ub_row_floor", False) and \
            getattr(cfg, "ub_mode", "fixed") == "table" and cfg.step_rule == "cfsgd" else ub
        if cfg.step_rule == "rowwise_adagrad":
            st["adagrad_sum"][i] += sum(x * x for x in d) / len(d)
            eta = cfg.lr / (math.sqrt(st["adagrad_sum"][i]) + cfg.eps)
        else:
            if getattr(cfg, "counter_bytes", 4) != 4:
                st["counter"][i], c = ref_compact_counter(int(st["counter"][i]), rows[i], step, cfg.counter_bytes)
            else:
                last = st["last_step"][i] if "last_step" in st else 0
                c, last = ref_counter(st["counter"][i], last, step, cfg.counter_halflife)
                st["counter"][i] = c
                if "last_step" in st:
                    st["last_step"][i] = last
            if cfg.counter_form == "paper" and cfg.horizon > 0:
                # Li et al. 2021, literally: eta_k = min(eta_max, alpha / sqrt(T p_hat_k)), p_hat_k = c_k / t,
                # with alpha = lr / sqrt(ub) (no eps: 1e-8 is far below the tolerance)
                p_hat = c / step
                eta = min(cfg.lr_max, (cfg.lr / math.sqrt(ub_i)) / math.sqrt(cfg.horizon * p_hat))
            else:
                eta = min(cfg.lr_max, cfg.lr / (math.sqrt(ub_i * c) + cfg.eps))
            if cfg.adjustment_iter > 0:
                st["adagrad_sum"][i] += sum(x * x for x in d) / len(d)
                if step <= cfg.adjustment_iter:
                    eta = cfg.lr / (math.sqrt(st["adagrad_sum"][i]) + cfg.eps)
        out.append([a - eta * b for a, b in zip(w[i], d)])
    return out, st, lams
