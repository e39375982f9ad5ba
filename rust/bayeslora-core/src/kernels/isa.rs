//! The instruction set the kernels run on, chosen once per process and carried as a type.
//!
//! [`Avx2`] and [`Avx512`] are tokens: values that only [`Avx2::detect`] and
//! [`Avx512::detect`] can make, and only on a CPU that has the features. A kernel that needs a
//! feature takes its token, so a safe function can call its `#[target_feature]` code without
//! trusting a flag from its caller (as the `gemm` crate's `simd` tokens and `matrixmultiply`'s
//! one-type-per-ISA kernels). [`Isa::get`] runs the detection once ([`OnceLock`]) and hands out
//! the widest set; tests and benches may pass a narrower one from [`Isa::available`].

use std::sync::OnceLock;

/// Proof that this CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx2 {
    _detected: (),
}

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token, if this CPU has AVX2 and FMA.
    pub fn detect() -> Option<Self> {
        (std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
            .then_some(Self { _detected: () })
    }
}

/// Proof that this CPU has AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Avx512 {
    avx2: Avx2,
}

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The token, if this CPU has AVX-512F, AVX2 and FMA.
    pub fn detect() -> Option<Self> {
        let avx2 = Avx2::detect()?;
        std::is_x86_feature_detected!("avx512f").then_some(Self { avx2 })
    }

    /// AVX-512 implies AVX2 and FMA.
    pub fn avx2(self) -> Avx2 {
        self.avx2
    }
}

/// An instruction set of the kernels, with the token that proves the CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (`mul_add` chains, auto-vectorised elementwise loops).
    Scalar,
    /// 8-lane AVX2 + FMA micro-kernels (6 × 16 tiles), AVX2 clones of the elementwise loops.
    #[cfg(target_arch = "x86_64")]
    Avx2(Avx2),
    /// 16-lane AVX-512 micro-kernels (12 × 16 and 12 × 32 tiles), AVX-512 softmax, GELU,
    /// LayerNorm and panel transposes; AVX2 elsewhere.
    #[cfg(target_arch = "x86_64")]
    Avx512(Avx512),
}

impl Isa {
    /// The widest instruction set of this CPU, detected now.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(t) = Avx512::detect() {
                return Isa::Avx512(t);
            }
            if let Some(t) = Avx2::detect() {
                return Isa::Avx2(t);
            }
        }
        Isa::Scalar
    }

    /// The widest instruction set of this CPU, detected on the first call of the process.
    #[inline]
    pub fn get() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(Self::detect)
    }

    /// Every instruction set this CPU can run, narrowest first ([`Isa::Scalar`] always).
    pub fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            out.extend(Avx2::detect().map(Isa::Avx2));
            out.extend(Avx512::detect().map(Isa::Avx512));
        }
        out
    }

    /// The AVX2 token, when this set includes AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn avx2(self) -> Option<Avx2> {
        match self {
            Isa::Scalar => None,
            Isa::Avx2(t) => Some(t),
            Isa::Avx512(t) => Some(t.avx2()),
        }
    }

    /// The AVX-512 token, when this set is AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    pub fn avx512(self) -> Option<Avx512> {
        match self {
            Isa::Avx512(t) => Some(t),
            _ => None,
        }
    }

    /// A short name (`"scalar"`, `"avx2"`, `"avx512"`), for benches and messages.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => "avx512",
        }
    }
}
