"""Speed layer: faust stream workers that count plays, fold in users and tracks and serve HTTP."""
