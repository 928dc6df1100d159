"""Classical teachers behind one Recommender protocol: Popularity, BPR-MF, SASRec."""
