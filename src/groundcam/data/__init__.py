"""Datasets and readers: grounding samples, Flickr30k Entities, RefCOCO, captions, Visual Genome, shapes, glyphs."""
