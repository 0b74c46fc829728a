import math

import torch

from fedsoda_cli.evaluation.perplexity import perplexity


def test_perplexity_is_exp_of_mean_token_nll_computed_by_hand(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (3, 10), generator=g)
    nlls = []
    with torch.no_grad():
        for row in windows:
            for t in range(1, len(row)):
                logits = model(input_ids=row[:t][None]).logits[0, -1].double()
                nlls.append(-torch.log_softmax(logits, -1)[row[t]].item())
    result = perplexity(model, windows, batch_size=2)
    assert result.tokens == 3 * 9 == len(nlls)
    assert math.isclose(result.nll, sum(nlls) / len(nlls), rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(sum(nlls) / len(nlls)), rel_tol=1e-4)
    # a random tiny model is close to uniform over its vocabulary
    assert 0.3 * model.config.vocab_size < result.perplexity < 3 * model.config.vocab_size
