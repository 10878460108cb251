import torch

# The suite runs many tiny ops: one intra-op thread avoids OpenMP oversubscription, which
# made it ~10x slower on this 2-core machine. The zoo sweep raises it again for big models.
torch.set_num_threads(1)
