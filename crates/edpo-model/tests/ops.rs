//! Every routed operation of `edpo_model::ops`, fused against composed: values, and the
//! gradients of `⟨out, probe⟩` with respect to every input. A test binary of its own with one
//! test, because forcing the composed path is process-wide.

use candle_core::{Device, Result, Tensor, Var};
use edpo_model::ops::*;

fn close(name: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    assert_eq!(a.len(), b.len(), "{name}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{name}, element {i}: {x} vs {y}"
        );
    }
}

fn var(shape: &[usize], seed: usize, scale: f32) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((((i + seed) * 7919 % 1000) as f32 / 500.0) - 1.0) * scale)
        .collect();
    Var::from_vec(v, shape, &Device::Cpu).expect("var")
}

/// An additive causal mask `(b, 1, t, t)`, also hiding where `hide(row, query, key)`.
fn causal_mask(b: usize, t: usize, hide: impl Fn(usize, usize, usize) -> bool) -> Tensor {
    let mut mask = vec![0f32; b * t * t];
    for n in 0..b {
        for i in 0..t {
            for j in 0..t {
                if j > i || hide(n, i, j) {
                    mask[(n * t + i) * t + j] = -1e30;
                }
            }
        }
    }
    Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu).expect("mask")
}

type Case<'a> = (&'a str, Box<dyn Fn() -> Result<Tensor> + 'a>, Vec<&'a Var>);

/// Runs `f` with the composed path forced, restoring the fused path after.
fn composed_run(f: &dyn Fn() -> Result<Tensor>) -> Result<Tensor> {
    set_composed(true);
    let out = f();
    set_composed(false);
    out
}

#[test]
fn every_op_fused_equals_composed_in_values_and_gradients() -> Result<()> {
    let x = var(&[2, 3, 40], 0, 2.0);
    let w = Var::from_vec(
        (0..40).map(|i| 0.5 + i as f32 / 40.0).collect::<Vec<f32>>(),
        40,
        &Device::Cpu,
    )?;
    let b = Var::from_vec(
        (0..40).map(|i| i as f32 / 80.0 - 0.2).collect::<Vec<f32>>(),
        40,
        &Device::Cpu,
    )?;
    let w_in = var(&[40, 24], 1, 0.1);
    let w_out = var(&[24, 40], 2, 0.1);
    let b24 = var(&[24], 3, 0.3);
    let logits = var(&[5, 33], 4, 3.0);
    let targets = [0u32, 32, 7, 7, 12];
    let (bh, h, t, hd) = (2, 3, 5, 4);
    let q = var(&[bh, h, t, hd], 5, 1.0);
    let k = var(&[bh, h, t, hd], 6, 1.0);
    let v = var(&[bh, h, t, hd], 7, 1.0);
    let padded = causal_mask(bh, t, |n, i, j| n == 1 && j == 2 && i != 2);
    let qkv = var(&[bh, t, 3 * h * hd], 8, 1.0);
    let causal = causal_mask(bh, t, |_, _, _| false);
    // Large enough for the GEMM kernel (every dimension at least 192) where the CPU has it.
    let xl = var(&[2, 100, 192], 9, 1.0);
    let wl_in = var(&[192, 256], 10, 0.1);
    let wl_out = var(&[256, 192], 11, 0.1);
    let bl = var(&[256], 12, 0.3);
    // Heads 256 wide together: their products go through the GEMM kernel too.
    let (hw, tw, hdw) = (4, 9, 64);
    let qw = var(&[bh, hw, tw, hdw], 13, 0.5);
    let kw = var(&[bh, hw, tw, hdw], 14, 0.5);
    let vw = var(&[bh, hw, tw, hdw], 15, 1.0);
    let paddedw = causal_mask(bh, tw, |n, i, j| n == 0 && j == 3 && i != 3);
    let qkvw = var(&[bh, tw, 3 * hw * hdw], 16, 0.5);
    let causalw = causal_mask(bh, tw, |_, _, _| false);
    // LoRA adapters of rank 4 on a frozen base (the base weights are plain tensors: frozen).
    let lora_a = var(&[4, 40], 17, 0.3);
    let lora_b = var(&[24, 4], 18, 0.3);
    let lora_al = var(&[4, 192], 19, 0.3);
    let lora_bl = var(&[256, 4], 20, 0.3);
    let frozen_out = w_out.as_tensor().detach();
    let frozen_in = w_in.as_tensor().detach();
    let frozen_bias = b24.as_tensor().detach();
    let frozen_large = wl_out.as_tensor().detach();
    // Rotary tables (any values: the algebra is what is checked) and SwiGLU's second input.
    let cos = var(&[bh, 1, t, hd], 21, 1.0).as_tensor().detach();
    let sin = var(&[bh, 1, t, hd], 22, 1.0).as_tensor().detach();
    let up = var(&[2, 3, 40], 23, 1.5);
    // A Llama-family model's projections: 6 query heads over 2 key/value heads, narrow (4 wide)
    // and wide (64 wide: 384 together, the GEMM kernel's), with their rotary tables.
    let (hq, hkv) = (6, 2);
    let qr = var(&[bh, t, hq * hd], 24, 1.0);
    let kr = var(&[bh, t, hkv * hd], 25, 1.0);
    let vr = var(&[bh, t, hkv * hd], 26, 1.0);
    let qrw = var(&[bh, tw, hq * hdw], 27, 0.5);
    let krw = var(&[bh, tw, hkv * hdw], 28, 0.5);
    let vrw = var(&[bh, tw, hkv * hdw], 29, 1.0);
    let cosw = var(&[bh, 1, tw, hdw], 30, 1.0).as_tensor().detach();
    let sinw = var(&[bh, 1, tw, hdw], 31, 1.0).as_tensor().detach();
    eprintln!(
        "GEMM kernel {}",
        if edpo_model::kernels::gemm::eligible(200, 256, 192) {
            "in use"
        } else {
            "not available on this CPU"
        }
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "large linear (no bias)",
            Box::new(|| linear(xl.as_tensor(), wl_out.as_tensor(), None, false)),
            vec![&xl, &wl_out],
        ),
        (
            "large linear (input-major, bias)",
            Box::new(|| {
                linear(
                    xl.as_tensor(),
                    wl_in.as_tensor(),
                    Some(bl.as_tensor()),
                    true,
                )
            }),
            vec![&xl, &wl_in, &bl],
        ),
        (
            "large linear (output-major, bias)",
            Box::new(|| {
                linear(
                    xl.as_tensor(),
                    wl_out.as_tensor(),
                    Some(bl.as_tensor()),
                    false,
                )
            }),
            vec![&xl, &wl_out, &bl],
        ),
        ("gelu", Box::new(|| gelu(x.as_tensor())), vec![&x]),
        (
            "softmax",
            Box::new(|| softmax_last(x.as_tensor())),
            vec![&x],
        ),
        (
            "layer_norm",
            Box::new(|| layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)),
            vec![&x, &w, &b],
        ),
        (
            "rms_norm",
            Box::new(|| rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)),
            vec![&x, &w],
        ),
        (
            "linear (input-major, bias)",
            Box::new(|| linear(x.as_tensor(), w_in.as_tensor(), Some(b24.as_tensor()), true)),
            vec![&x, &w_in, &b24],
        ),
        (
            "linear (output-major, bias)",
            Box::new(|| {
                linear(
                    x.as_tensor(),
                    w_out.as_tensor(),
                    Some(b24.as_tensor()),
                    false,
                )
            }),
            vec![&x, &w_out, &b24],
        ),
        (
            "linear (no bias)",
            Box::new(|| linear(x.as_tensor(), w_out.as_tensor(), None, false)),
            vec![&x, &w_out],
        ),
        (
            "log_softmax_gather",
            Box::new(|| log_softmax_gather(logits.as_tensor(), &targets)),
            vec![&logits],
        ),
        (
            "attention (causal, a padded key)",
            Box::new(|| attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &padded, 0.5)),
            vec![&q, &k, &v],
        ),
        (
            "packed attention",
            Box::new(|| packed_attention(qkv.as_tensor(), h, &causal, 0.5)),
            vec![&qkv],
        ),
        (
            "wide attention (causal, a padded key)",
            Box::new(|| {
                attention(
                    qw.as_tensor(),
                    kw.as_tensor(),
                    vw.as_tensor(),
                    &paddedw,
                    0.125,
                )
            }),
            vec![&qw, &kw, &vw],
        ),
        (
            "lora linear (frozen output-major base, bias)",
            Box::new(|| {
                lora_linear(
                    x.as_tensor(),
                    (&frozen_out, Some(&frozen_bias), false),
                    (lora_a.as_tensor(), lora_b.as_tensor(), 2.0),
                )
            }),
            vec![&x, &lora_a, &lora_b],
        ),
        (
            "lora linear (frozen input-major base)",
            Box::new(|| {
                lora_linear(
                    x.as_tensor(),
                    (&frozen_in, None, true),
                    (lora_a.as_tensor(), lora_b.as_tensor(), 0.5),
                )
            }),
            vec![&x, &lora_a, &lora_b],
        ),
        (
            "large lora linear (frozen base)",
            Box::new(|| {
                lora_linear(
                    xl.as_tensor(),
                    (&frozen_large, None, false),
                    (lora_al.as_tensor(), lora_bl.as_tensor(), 4.0),
                )
            }),
            vec![&xl, &lora_al, &lora_bl],
        ),
        (
            "rope",
            Box::new(|| rope(q.as_tensor(), &cos, &sin)),
            vec![&q],
        ),
        (
            "silu_mul",
            Box::new(|| silu_mul(x.as_tensor(), up.as_tensor())),
            vec![&x, &up],
        ),
        (
            "wide packed attention",
            Box::new(|| packed_attention(qkvw.as_tensor(), hw, &causalw, 0.125)),
            vec![&qkvw],
        ),
        (
            "rotary attention (grouped heads, a padded key)",
            Box::new(|| {
                rotary_attention(
                    qr.as_tensor(),
                    kr.as_tensor(),
                    vr.as_tensor(),
                    (hq, hkv),
                    (&cos, &sin),
                    &padded,
                    0.5,
                )
            }),
            vec![&qr, &kr, &vr],
        ),
        (
            "rotary attention (one key/value head per query head)",
            Box::new(|| {
                rotary_attention(
                    &q.as_tensor().transpose(1, 2)?.reshape((bh, t, h * hd))?,
                    &k.as_tensor().transpose(1, 2)?.reshape((bh, t, h * hd))?,
                    &v.as_tensor().transpose(1, 2)?.reshape((bh, t, h * hd))?,
                    (h, h),
                    (&cos, &sin),
                    &causal,
                    0.5,
                )
            }),
            vec![&q, &k, &v],
        ),
        (
            "wide rotary attention (grouped heads, a padded key)",
            Box::new(|| {
                rotary_attention(
                    qrw.as_tensor(),
                    krw.as_tensor(),
                    vrw.as_tensor(),
                    (hq, hkv),
                    (&cosw, &sinw),
                    &paddedw,
                    0.125,
                )
            }),
            vec![&qrw, &krw, &vrw],
        ),
    ];
    for (name, op, vars) in &cases {
        let fused_out = op()?;
        let composed_out = composed_run(op.as_ref())?;
        close(name, &fused_out, &composed_out, 1e-5);
        let probe = Tensor::from_vec(
            (0..fused_out.elem_count())
                .map(|i| ((i * 31 % 17) as f32) / 17.0 - 0.5)
                .collect::<Vec<f32>>(),
            fused_out.dims(),
            &Device::Cpu,
        )?;
        let gf = (&fused_out * &probe)?.sum_all()?.backward()?;
        let gc = (&composed_out * &probe)?.sum_all()?.backward()?;
        for (i, var) in vars.iter().enumerate() {
            match (gf.get(var.as_tensor()), gc.get(var.as_tensor())) {
                (Some(p), Some(c)) => close(&format!("{name}: gradient {i}"), p, c, 1e-4),
                _ => panic!("{name}: gradient {i} is missing on one side"),
            }
        }
    }
    // Rotary embeddings and SwiGLU's gate compute the composed expressions in the same order:
    // the same values bit for bit.
    for (name, op) in [
        (
            "rope",
            Box::new(|| rope(q.as_tensor(), &cos, &sin)) as Box<dyn Fn() -> Result<Tensor>>,
        ),
        (
            "silu_mul",
            Box::new(|| silu_mul(x.as_tensor(), up.as_tensor())),
        ),
    ] {
        let fused_bits: Vec<u32> = op()?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let composed_bits: Vec<u32> = composed_run(op.as_ref())?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(fused_bits, composed_bits, "{name}: not bit-equal");
    }
    // A frozen linear map (LoRA's base): the same values and input gradient as the composed
    // map, and no gradient at all for its weight or bias on the fused path.
    for (x, w, bias, input_major) in [
        (&x, &w_in, Some(&b24), true),
        (&x, &w_out, Some(&b24), false),
        (&x, &w_out, None, false),
        (&xl, &wl_out, None, false),
        (&xl, &wl_in, Some(&bl), true),
    ] {
        let op = || {
            linear_frozen(
                x.as_tensor(),
                w.as_tensor(),
                bias.map(Var::as_tensor),
                input_major,
            )
        };
        let fused_out = op()?;
        let composed_out = composed_run(&op)?;
        close("frozen linear", &fused_out, &composed_out, 1e-5);
        let probe = composed_out.ones_like()?.affine(0.3, 0.1)?;
        let gf = (&fused_out * &probe)?.sum_all()?.backward()?;
        let gc = (&composed_out * &probe)?.sum_all()?.backward()?;
        let (dxf, dxc) = (gf.get(x.as_tensor()), gc.get(x.as_tensor()));
        close(
            "frozen linear: input gradient",
            dxf.expect("fused dx"),
            dxc.expect("composed dx"),
            1e-4,
        );
        assert!(
            gf.get(w.as_tensor()).is_none(),
            "a frozen weight got a gradient"
        );
        if let Some(b) = bias {
            assert!(
                gf.get(b.as_tensor()).is_none(),
                "a frozen bias got a gradient"
            );
        }
    }
    Ok(())
}
