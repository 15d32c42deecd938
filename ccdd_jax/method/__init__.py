"""The method: models, DSA, the inner loop, Stage I (watermark, experts), Stage II
(distillation), Stage III (verification) and evaluation."""
