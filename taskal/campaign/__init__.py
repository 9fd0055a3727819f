"""Label campaigns: the state of a real active-learning campaign across rounds.

A campaign lives in a work dir: an SQLite database (items, rounds, queries, labels), one
folder per round with what annotators receive, and a report.
"""
