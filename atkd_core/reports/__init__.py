"""Reports: statistics, tables, figures and the Markdown a person reads.

``comparison`` (a grid's report), ``difficulty`` (a teacher's token difficulty), ``evaluation``
(the evaluate stage's summary), built on ``statistics``, ``tables`` and ``figures``.
"""
