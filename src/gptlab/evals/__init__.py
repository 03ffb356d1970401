"""Evaluating a model: the loss and bits per byte over a whole split (`split`), HellaSwag (`hellaswag`), and the
long-context probes (`probes`): loss by position and associative recall at a distance."""
