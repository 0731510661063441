"""``samkit serve``: a local web page and JSON API for clicking, boxing and 'segment everything' (needs samkit[serve])."""
