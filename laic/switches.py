"""The words LAIC's method switches take, in a module that loads nothing else: the command line offers them as
choices without importing torch (which cost every `laic` command line, `--help` and a mistyped flag among them, 2 to
3 s before a word was said)."""

# The space whose kNN graph keeps (filters) the image-space neighbours: the text counterparts' (stage 0's default),
# the relation features' (laic.relations), or none (every image-space neighbour is kept).
NEIGHBOUR_FILTERS = ("text", "relation", "none")
# Where the partition comes from: stages 0 and 1's k-means, or SIC's semantic pseudo-labels (laic.pseudo_labels).
PSEUDO_LABELS = ("kmeans", "semantic")
