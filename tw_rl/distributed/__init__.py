"""The Ray wing: every use of Ray in tw-rl. Plain classes live outside it; here they become actors.

- :mod:`~tw_rl.distributed.cluster` — :func:`init_ray` (a private local Ray on 127.0.0.1 with a token, or
  ``RAY_ADDRESS``), :func:`shutdown_ray`, resource checks.
- :mod:`~tw_rl.distributed.teacher` — ``TeacherActor`` (the plain :class:`~tw_rl.teacher_server.TeacherServer`),
  :func:`start_teacher`, :class:`RemoteTeacher` (the client rollout workers call).
- :mod:`~tw_rl.distributed.rollout` — ``RolloutWorkerActor`` and :class:`RolloutGroup` (parallel sampling,
  restarts, stale episodes; a local mode runs the same :class:`~tw_rl.rollout.RolloutWorker` without Ray).
- :mod:`~tw_rl.distributed.data_parallel` — the data-parallel PCL learner (DDP replicas in Ray actors).
- :mod:`~tw_rl.distributed.rllib_ppo` — RLlib's PPO on the token MDP (``algo=rllib_ppo``).
- :mod:`~tw_rl.distributed.tune` — the trials of ``tw-rl sweep`` on Ray Tune.
- :mod:`~tw_rl.distributed.launch` — ``tw-rl head`` / ``tw-rl submit``: the ``ray start`` / ``ray job submit``
  command lines (a head bound to loopback, token authentication); it runs the ``ray`` command, imports no Ray.

Imports point into the wing, never out of it to the driver: ``tw_rl.train`` and ``tw_rl.sweep`` import it, and the
sweep hands Tune its trial function rather than the wing importing ``tw_rl.train``. This file imports nothing, so
that importing one module of the wing loads only what that module needs.
"""
