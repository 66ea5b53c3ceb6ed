"""Plain reference implementations used only by the tests.

Deliberately straightforward and independent of ``pipeline.relevancy``: transformers' own eager
attention with ``output_attentions=True`` on a deep copy of the model whose parameters require
grad, ``retain_grad`` on the returned attention probabilities, one full backward pass per target,
the full N x N relevancy matrix ``R`` and explicit Python loops over layers and heads.

Conventions are the engine's: a target ``(start, end)`` explains ``input_ids[0, start:end]``;
its score is ``sum_p logits[p-1, input_ids[p]]`` and its read-out is the mean over ``p`` of row
``p-1``. Layers are indexed 0..L-1 from the input side.
"""

from __future__ import annotations

import copy

import torch


def reference_explain(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    targets: list[tuple[int, int]],
) -> list[dict[str, torch.Tensor]]:
    """Per target, a dict of full-length (N,) read-out vectors and (M,) image-token maps.

    Keys: ``chefer``, ``raw_attention``, ``rollout`` (N,) and ``layer_weighted``,
    ``head_importance``, ``attention_flow``, ``consensus``, ``gradcam``, ``activation_norm`` (M,),
    plus ``score`` (scalar) and ``image_positions``.
    """
    ref = copy.deepcopy(model).float()
    ref.set_attn_implementation("eager")
    ref.eval()
    ref.requires_grad_(True)

    stored: dict[str, torch.Tensor] = {}

    def keep_embeds(module, args, kwargs):
        stored["embeds"] = kwargs["inputs_embeds"]
        stored["embeds"].retain_grad()

    handle = ref.model.language_model.register_forward_pre_hook(keep_embeds, with_kwargs=True)
    out = ref(
        input_ids=input_ids,
        pixel_values=pixel_values.float(),
        token_type_ids=token_type_ids,
        output_attentions=True,
        use_cache=False,
    )
    handle.remove()
    attentions = list(out.attentions)  # L tensors (1, H, N, N)
    for a in attentions:
        a.retain_grad()
    embeds = stored["embeds"]
    n = input_ids.shape[1]
    n_layers = len(attentions)
    n_heads = attentions[0].shape[1]
    img = torch.nonzero(input_ids[0] == model.config.image_token_id).flatten()

    results = []
    for start, end in targets:
        ref.zero_grad(set_to_none=True)
        for a in attentions:
            a.grad = None
        embeds.grad = None
        score = sum(out.logits[0, p - 1, input_ids[0, p]] for p in range(start, end))
        score.backward(retain_graph=True)

        # Chefer: R = I; R <- R + Abar_l @ R for l = 0..L-1; read rows p-1
        r_mat = torch.eye(n, dtype=torch.float64)
        for a in attentions:
            cam = a.grad[0].double() * a.detach()[0].double()
            abar = cam.clamp(min=0).mean(dim=0)
            r_mat = r_mat + abar @ r_mat
        rows = list(range(start - 1, end - 1))
        chefer = r_mat[rows].mean(dim=0)

        # head-mean attention per layer, read-out rows averaged
        read = []  # per layer: (H, N)
        for a in attentions:
            read.append(a.detach()[0][:, rows, :].double().mean(dim=1))
        raw = read[-1].mean(dim=0)

        # rollout with full matrices
        roll = torch.eye(n, dtype=torch.float64)
        for a in attentions:
            ahat = 0.5 * a.detach()[0].double().mean(dim=0) + 0.5 * torch.eye(n, dtype=torch.float64)
            ahat = ahat / ahat.sum(dim=-1, keepdim=True)
            roll = ahat @ roll
        rollout = roll[rows].mean(dim=0)

        # layer weighted
        lw = torch.zeros(len(img), dtype=torch.float64)
        for layer in range(n_layers):
            lw += (layer + 1) / n_layers * read[layer].mean(dim=0)[img]
        lw /= n_layers

        # head importance over all layers and heads
        weights, maps_ = [], []
        for layer in range(n_layers):
            for h in range(n_heads):
                att = read[layer][h][img]
                entropy = -(att * torch.log(att + 1e-10)).sum()
                weights.append(att.max() / (1 + entropy))
                maps_.append(att)
        total = sum(weights)
        hi = sum(wt / total * mp for wt, mp in zip(weights, maps_))

        # decayed flow: last layer 0.5, then penultimate 0.5*1, previous 0.5*0.5, ...
        flow = 0.5 * read[-1].mean(dim=0)[img]
        for i, layer in enumerate(range(n_layers - 2, -1, -1)):
            flow = flow + 0.5 * (0.5**i) * read[layer].mean(dim=0)[img]

        consensus = (lw / lw.sum() + hi / hi.sum() + flow / flow.sum()) / 3

        e_img = embeds.detach()[0, img].double()
        g_img = embeds.grad[0, img].double()
        gradcam = (g_img * e_img).sum(dim=-1).clamp(min=0)
        act = e_img.norm(dim=-1)

        results.append(
            {
                "chefer": chefer,
                "raw_attention": raw,
                "rollout": rollout,
                "layer_weighted": lw,
                "head_importance": hi,
                "attention_flow": flow,
                "consensus": consensus,
                "gradcam": gradcam,
                "activation_norm": act,
                "score": score.detach(),
                "image_positions": img,
            }
        )
    return results


def full_matrix_rows(abars: list[torch.Tensor], rows: list[int]) -> torch.Tensor:
    """Mean of rows ``rows`` of ``R`` with ``R = I``, ``R <- R + Abar_l @ R`` for l = 0..L-1."""
    n = abars[0].shape[-1]
    r_mat = torch.eye(n, dtype=abars[0].dtype)
    for a in abars:
        r_mat = r_mat + a @ r_mat
    return r_mat[rows].mean(dim=0)


def reference_chefer(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    targets: list[tuple[int, int]],
) -> list[torch.Tensor]:
    """Chefer relevancy only, the plain way, in the model's device and float32 arithmetic.

    One eager forward with ``output_attentions=True`` (parameters requiring grad, as in the
    earlier tools), one ``backward`` per target filling parameter gradients, the full N x N
    ``R`` per target. Returns the read-out vectors (N,) (float32, on the model's device). Used
    by the benchmark as the baseline cost and by the tests as a second reference.
    """
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    impl = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    model.eval()
    model.requires_grad_(True)
    try:
        device = next(model.parameters()).device
        out = model(
            input_ids=input_ids.to(device),
            pixel_values=pixel_values.to(device, next(model.parameters()).dtype),
            token_type_ids=None if token_type_ids is None else token_type_ids.to(device),
            output_attentions=True,
            use_cache=False,
        )
        attentions = list(out.attentions)
        for a in attentions:
            a.retain_grad()
        n = input_ids.shape[1]
        results = []
        for start, end in targets:
            model.zero_grad(set_to_none=True)
            for a in attentions:
                a.grad = None
            score = sum(out.logits[0, p - 1, int(input_ids[0, p])].float() for p in range(start, end))
            score.backward(retain_graph=True)
            r_mat = torch.eye(n, device=device, dtype=torch.float32)
            for a in attentions:
                abar = (a.grad[0].float() * a.detach()[0].float()).clamp(min=0).mean(dim=0)
                r_mat = r_mat + abar @ r_mat
            results.append(r_mat[start - 1 : end - 1].mean(dim=0))
        model.zero_grad(set_to_none=True)
        return results
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.set_attn_implementation({"text_config": impl})
        model.train(was_training)
