"""CTR prediction for TrackRec (KAR style): impressions, HEA knowledge adaptor, DIN / DeepFM / DCNv2, training.

Own small backbones rather than deepctr-torch: see README "TrackRec: CTR backbones" for the measured reasons.
"""
