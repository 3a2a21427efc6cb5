"""Every run's checkpoint stream through the Python API: an induction score from the cache, by hand.

    python examples/analysis.py runs/demo          # any few-shot workdir

For each run and checkpoint it computes, from the last layer's attention
pattern, how much the query attends to the label tokens after exemplars of
its own class minus the other label tokens (Singh et al. 2024's induction
strength), on the run's own `fsl_train` evaluation set; prints the largest
difference from the `induction_strength` that training logged in
metrics.csv; and plots each head's score against training sequences into
WORKDIR/example_induction.png. (tests/test_api.py runs it.)
"""
import sys

import matplotlib.pyplot as plt

import icldyn

wd = icldyn.load(sys.argv[1])
logged = wd.logged("fsl_train", "induction_strength")  # index (run, step), a column per head
layer, worst = f"layer_{wd.config.model.num_layers - 1}/attn/pattern", 0.0
for run in wd:
  batch = run.batch("fsl_train", size=wd.config.eval.size)  # the sequences training evaluated
  same = batch.classes[:, None, :-1] == batch.classes[:, None, -1:]  # [B, 1, C]: query's class
  scores = []
  for step, params in run.stream():
    attn = run.forward(params, batch, names=[layer])[1][layer][:, :, -1, 1:-1:2]  # [B, H, C]
    scores.append(((attn * same).sum(-1) - (attn * ~same).sum(-1)).mean(0))  # [H]
    worst = max(worst, abs(scores[-1] - logged.loc[(run.index, step)]).max())
  plt.plot(run.steps, scores, lw=1)
print(f"largest difference from the logged induction_strength: {worst:.2e}")
plt.xlabel("training sequences"), plt.ylabel("induction score by hand (each head)")
plt.savefig(f"{wd.path}/example_induction.png", dpi=120)
