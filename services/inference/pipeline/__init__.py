"""The worker's request pipeline: stage modules with narrow interfaces."""
