"""Differential fuzzing (`cnnc fuzz`): random valid models, compiled for every configuration and
judged against the NumPy reference; a failure is shrunk and written as files that reproduce it.

By stage: `configs` (the ways to compile a model), `model` (a model file as a user writes it,
and its input), `generate` (models, weights, inputs, schedules), `judge` (one model on its
configurations, against the reference and its float32 envelope), `runner` (worker processes),
`shrink`, `replay` (case files), `loop` (`fuzz()`, the run) and `command` (the click command).
`training` is the training mode (`cnnc fuzz --train`): models of the ops whose gradient
`compile_training` compiles, a random loss, reduction and batch of 1 to 40 images, one step
with lr 0 whose loss and every gradient must match `reference_backward` (as outputs match the
reference), and the same bits on a second step and on two threads as on one.
Everything random comes from `numpy.random.default_rng((seed, index))`, so a seed always gives
the same models in any number of workers; nothing here imports a pass or a backend.
"""
