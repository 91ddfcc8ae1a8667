"""Running a whole job.

Its stages in order (:mod:`.stages`), the resume record (:mod:`.record`), the runner (:mod:`.run`),
``skypipe status`` (:mod:`.status`) and the ``run`` / ``status`` commands (:mod:`.commands`).
"""
