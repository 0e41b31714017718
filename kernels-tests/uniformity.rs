//! Portability: no barrier (`workgroupBarrier`, `storageBarrier`,
//! `workgroupUniformLoad`) and no subgroup operation in any kernel sits in
//! control flow that depends on invocation-varying values. Such code is undefined
//! behaviour in WGSL; lavapipe and many GPUs happen to run it, others hang or
//! give wrong answers. naga's validator records barriers' uniformity
//! requirements but does not reject them, and treats every local variable as
//! varying (so it cannot tell a uniform loop counter from a varying one): this
//! test runs its own analysis over naga's IR of every shader, under every
//! prelude, with the WGSL rules: values from invocation-varying built-ins,
//! private and function-local data written from varying values or under varying
//! control flow, read-write storage and workgroup memory are varying; a branch,
//! switch or loop exit on a varying value makes what it controls varying, and so
//! does a `return` or `break` taken by only some invocations for everything
//! after it.

use cvt_gpu::gpu::SHADERS;
use cvt_gpu::texread::{prelude, TexRead};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use naga::{AddressSpace, Block, BuiltIn, Expression as E, Function, Handle, Module, Statement as S};
use std::collections::HashSet;

/// How a block was left by some invocations only.
#[derive(Default, Clone, Copy)]
struct Exit {
    ret: bool,
    brk: bool,
}

struct Analysis<'a> {
    module: &'a Module,
    fun: &'a Function,
    /// Whether each argument varies across invocations.
    args: Vec<bool>,
    /// Expressions whose value varies across the invocations of a workgroup.
    varying: Vec<bool>,
    varying_locals: HashSet<Handle<naga::LocalVariable>>,
    /// (function, statement) descriptions of synchronisation in varying flow.
    violations: Vec<String>,
    /// Call results, the function and the arguments they were computed from.
    call_args: Vec<(Handle<naga::Expression>, Handle<Function>, Vec<Handle<naga::Expression>>)>,
    /// Whether the function returns values that vary (a varying value, or a
    /// return taken in varying flow).
    returns_varying: bool,
    /// Locals that hold one constant wherever they are read (`constant_locals`).
    constant_locals: Locals,
}

/// A value known when the pipeline is created: literals, and constants and
/// operations on them once override constants are resolved.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Val {
    Bool(bool),
    Int(i64),
}

type Locals = std::collections::HashMap<Handle<naga::LocalVariable>, Val>;

fn const_eval(module: &Module, arena: &naga::Arena<naga::Expression>, locals: &Locals, e: Handle<naga::Expression>) -> Option<Val> {
    use naga::{BinaryOperator as B, Literal as L};
    let v = |x: Handle<naga::Expression>| const_eval(module, arena, locals, x);
    match &arena[e] {
        // A local that every reachable store sets to the same constant (naga
        // lowers a short-circuit `a && b` to one).
        E::Load { pointer } => match &arena[*pointer] {
            E::LocalVariable(l) => locals.get(l).copied(),
            _ => None,
        },
        E::Literal(L::Bool(b)) => Some(Val::Bool(*b)),
        E::Literal(L::U32(u)) => Some(Val::Int(*u as i64)),
        E::Literal(L::I32(i)) => Some(Val::Int(*i as i64)),
        E::Literal(L::AbstractInt(i)) => Some(Val::Int(*i)),
        E::Constant(c) => const_eval(module, &module.global_expressions, &Locals::new(), module.constants[*c].init),
        E::Unary { op: naga::UnaryOperator::LogicalNot, expr } => match v(*expr)? {
            Val::Bool(b) => Some(Val::Bool(!b)),
            _ => None,
        },
        E::Binary { op, left, right } => {
            let (l, r) = (v(*left), v(*right));
            match (op, l, r) {
                (B::LogicalAnd, Some(Val::Bool(false)), _) | (B::LogicalAnd, _, Some(Val::Bool(false))) => Some(Val::Bool(false)),
                (B::LogicalOr, Some(Val::Bool(true)), _) | (B::LogicalOr, _, Some(Val::Bool(true))) => Some(Val::Bool(true)),
                (B::LogicalAnd | B::LogicalOr, Some(Val::Bool(a)), Some(Val::Bool(b))) => Some(Val::Bool(if *op == B::LogicalAnd { a && b } else { a || b })),
                (B::Equal, Some(a), Some(b)) => Some(Val::Bool(a == b)),
                (B::NotEqual, Some(a), Some(b)) => Some(Val::Bool(a != b)),
                (B::Less, Some(Val::Int(a)), Some(Val::Int(b))) => Some(Val::Bool(a < b)),
                (B::LessEqual, Some(Val::Int(a)), Some(Val::Int(b))) => Some(Val::Bool(a <= b)),
                (B::Greater, Some(Val::Int(a)), Some(Val::Int(b))) => Some(Val::Bool(a > b)),
                (B::GreaterEqual, Some(Val::Int(a)), Some(Val::Int(b))) => Some(Val::Bool(a >= b)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The locals of `fun` that hold one constant wherever they are read: every
/// store that can run (branches on constants decided) stores that constant.
fn constant_locals(module: &Module, fun: &Function) -> Locals {
    fn stores(module: &Module, fun: &Function, known: &Locals, b: &Block, out: &mut std::collections::HashMap<Handle<naga::LocalVariable>, Vec<Option<Val>>>) {
        for s in b.iter() {
            match s {
                S::Store { pointer, value } => {
                    if let E::LocalVariable(l) = fun.expressions[*pointer] {
                        out.entry(l).or_default().push(const_eval(module, &fun.expressions, known, *value));
                    } else if let Some(l) = root_local(fun, *pointer) {
                        // A store into part of a local: not a constant.
                        out.entry(l).or_default().push(None);
                    }
                }
                S::Block(x) => stores(module, fun, known, x, out),
                S::If { condition, accept, reject } => match const_eval(module, &fun.expressions, known, *condition) {
                    Some(Val::Bool(true)) => stores(module, fun, known, accept, out),
                    Some(Val::Bool(false)) => stores(module, fun, known, reject, out),
                    _ => {
                        stores(module, fun, known, accept, out);
                        stores(module, fun, known, reject, out);
                    }
                },
                S::Switch { cases, .. } => cases.iter().for_each(|c| stores(module, fun, known, &c.body, out)),
                S::Loop { body, continuing, .. } => {
                    stores(module, fun, known, body, out);
                    stores(module, fun, known, continuing, out);
                }
                // A call may write a local through a pointer argument.
                S::Call { arguments, .. } => {
                    for a in arguments {
                        if let Some(l) = root_local(fun, *a) {
                            out.entry(l).or_default().push(None);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut known = Locals::new();
    // Each round can only decide more branches; a few rounds reach the fixed point.
    for _ in 0..4 {
        let mut all = std::collections::HashMap::new();
        for (l, var) in fun.local_variables.iter() {
            if let Some(init) = var.init {
                all.entry(l).or_insert_with(Vec::new).push(const_eval(module, &fun.expressions, &known, init));
            }
        }
        stores(module, fun, &known, &fun.body, &mut all);
        let next: Locals = all
            .into_iter()
            .filter_map(|(l, vals)| match vals.first() {
                Some(Some(v)) if vals.iter().all(|x| x == &Some(*v)) => Some((l, *v)),
                _ => None,
            })
            .collect();
        if next == known {
            break;
        }
        known = next;
    }
    known
}

/// The local a pointer expression is rooted at.
fn root_local(fun: &Function, mut p: Handle<naga::Expression>) -> Option<Handle<naga::LocalVariable>> {
    loop {
        match &fun.expressions[p] {
            E::LocalVariable(l) => return Some(*l),
            E::Access { base, .. } | E::AccessIndex { base, .. } => p = *base,
            _ => return None,
        }
    }
}

fn const_bool(module: &Module, fun: &Function, locals: &Locals, e: Handle<naga::Expression>) -> Option<bool> {
    match const_eval(module, &fun.expressions, locals, e) {
        Some(Val::Bool(b)) => Some(b),
        _ => None,
    }
}

/// Whether function `fun` (or one it calls) synchronises, in branches that can
/// run with the resolved override constants.
fn synchronises(module: &Module, fun: &Function) -> bool {
    fn block(module: &Module, fun: &Function, locals: &Locals, b: &Block) -> bool {
        let inner = |b: &Block| block(module, fun, locals, b);
        b.iter().any(|s| match s {
            S::ControlBarrier(_) | S::MemoryBarrier(_) | S::WorkGroupUniformLoad { .. } | S::SubgroupBallot { .. } | S::SubgroupCollectiveOperation { .. } | S::SubgroupGather { .. } => true,
            S::Block(b) => inner(b),
            S::If { condition, accept, reject } => match const_bool(module, fun, locals, *condition) {
                Some(true) => inner(accept),
                Some(false) => inner(reject),
                None => inner(accept) || inner(reject),
            },
            S::Switch { cases, .. } => cases.iter().any(|c| inner(&c.body)),
            S::Loop { body, continuing, .. } => inner(body) || inner(continuing),
            S::Call { function, .. } => synchronises(module, &module.functions[*function]),
            _ => false,
        })
    }
    block(module, fun, &constant_locals(module, fun), &fun.body)
}

impl<'a> Analysis<'a> {
    fn new(module: &'a Module, fun: &'a Function, args: Vec<bool>) -> Self {
        let mut call_args = vec![];
        collect_calls(&fun.body, &mut call_args);
        Analysis {
            module,
            fun,
            args,
            varying: vec![false; fun.expressions.len()],
            varying_locals: HashSet::new(),
            violations: vec![],
            call_args,
            returns_varying: false,
            constant_locals: constant_locals(module, fun),
        }
    }

    /// Expression variation, to a fixed point (handles need not be in order).
    fn expressions(&mut self) {
        loop {
            let mut changed = false;
            for (h, e) in self.fun.expressions.iter() {
                let v = |x: &Handle<naga::Expression>| self.varying[x.index()];
                let any = |xs: &[Option<Handle<naga::Expression>>]| xs.iter().flatten().any(v);
                let var = match e {
                    E::Literal(_) | E::Constant(_) | E::Override(_) | E::ZeroValue(_) => false,
                    E::Compose { components, .. } => components.iter().any(v),
                    E::Access { base, index } => v(base) || v(index),
                    E::AccessIndex { base, .. } => v(base),
                    E::Splat { value, .. } => v(value),
                    E::Swizzle { vector, .. } => v(vector),
                    E::FunctionArgument(i) => self.args[*i as usize],
                    E::GlobalVariable(g) => match self.module.global_variables[*g].space {
                        AddressSpace::Uniform | AddressSpace::Immediate | AddressSpace::Handle => false,
                        AddressSpace::Storage { access } => access.contains(naga::StorageAccess::STORE),
                        // Workgroup memory: each invocation may see other values
                        // (workgroupUniformLoad is the uniform read).
                        _ => true,
                    },
                    E::LocalVariable(l) => self.varying_locals.contains(l),
                    E::Load { pointer } => v(pointer),
                    E::ImageSample { image, sampler, coordinate, array_index, offset, level, depth_ref, .. } => {
                        let lv = match level {
                            naga::SampleLevel::Exact(x) | naga::SampleLevel::Bias(x) => Some(*x),
                            _ => None,
                        };
                        v(image) || v(sampler) || v(coordinate) || any(&[*array_index, *offset, lv, *depth_ref])
                    }
                    E::ImageLoad { image, coordinate, array_index, sample, level } => v(image) || v(coordinate) || any(&[*array_index, *sample, *level]),
                    E::ImageQuery { image, query } => v(image) || matches!(query, naga::ImageQuery::Size { level: Some(l) } if v(l)),
                    E::Unary { expr, .. } | E::Derivative { expr, .. } | E::As { expr, .. } => v(expr),
                    E::Binary { left, right, .. } => v(left) || v(right),
                    E::Select { condition, accept, reject } => v(condition) || v(accept) || v(reject),
                    E::Relational { argument, .. } => v(argument),
                    E::Math { arg, arg1, arg2, arg3, .. } => v(arg) || any(&[*arg1, *arg2, *arg3]),
                    E::ArrayLength(x) => v(x),
                    E::WorkGroupUniformLoadResult { .. } => false,
                    // A function's result, by analysing it with these arguments.
                    E::CallResult(_) => match self.call_args.iter().find(|(r, _, _)| *r == h) {
                        Some((_, f, a)) => {
                            let args = a.iter().map(v).collect();
                            Analysis::new(self.module, &self.module.functions[*f], args).run_quiet()
                        }
                        None => true,
                    },
                    // Subgroup results are uniform within a subgroup, not a workgroup;
                    // atomics return per-invocation values.
                    _ => true,
                };
                if var && !self.varying[h.index()] {
                    self.varying[h.index()] = true;
                    changed = true;
                }
            }
            if !changed {
                return;
            }
        }
    }

    /// The local a pointer expression is rooted at, and whether its indices vary.
    fn local_root(&self, mut p: Handle<naga::Expression>) -> Option<(Handle<naga::LocalVariable>, bool)> {
        let mut varying_index = false;
        loop {
            match &self.fun.expressions[p] {
                E::LocalVariable(l) => return Some((*l, varying_index)),
                E::Access { base, index } => {
                    varying_index |= self.varying[index.index()];
                    p = *base;
                }
                E::AccessIndex { base, .. } => p = *base,
                _ => return None,
            }
        }
    }

    /// Walks a block in flow `varying_flow`; with `record`, notes synchronisation
    /// in varying flow; always marks locals written from varying values or in
    /// varying flow.
    fn block(&mut self, b: &Block, varying_flow: bool, record: bool) -> Exit {
        let mut flow = varying_flow;
        let mut exit = Exit::default();
        for s in b.iter() {
            let e = match s {
                S::Block(inner) => self.block(inner, flow, record),
                S::If { condition, accept, reject } => match self.constant_bool(*condition) {
                    // A branch on an override constant (resolved): only the taken side.
                    Some(true) => self.block(accept, flow, record),
                    Some(false) => self.block(reject, flow, record),
                    None => {
                        let c = flow || self.varying[condition.index()];
                        let (a, r) = (self.block(accept, c, record), self.block(reject, c, record));
                        Exit { ret: a.ret || r.ret, brk: a.brk || r.brk }
                    }
                },
                S::Switch { selector, cases } => {
                    let c = flow || self.varying[selector.index()];
                    let mut e = Exit::default();
                    for case in cases {
                        let x = self.block(&case.body, c, record);
                        e.ret |= x.ret;
                    }
                    e
                }
                S::Loop { body, continuing, break_if } => {
                    // A loop left by some invocations only runs its body in varying flow.
                    let probe = self.block(body, flow, false);
                    let cont = self.block(continuing, flow || probe.brk, false);
                    let inner = flow || probe.brk || cont.brk || break_if.is_some_and(|c| self.varying[c.index()]);
                    let x = self.block(body, inner, record);
                    self.block(continuing, inner, record);
                    Exit { ret: x.ret, brk: false }
                }
                S::Break | S::Continue => Exit { ret: false, brk: flow },
                S::Return { value } => {
                    if flow || value.is_some_and(|v| self.varying[v.index()]) {
                        self.returns_varying = true;
                    }
                    Exit { ret: flow, brk: false }
                }
                S::Kill => Exit { ret: flow, brk: false },
                S::ControlBarrier(_) | S::MemoryBarrier(_) | S::WorkGroupUniformLoad { .. } | S::SubgroupBallot { .. } | S::SubgroupCollectiveOperation { .. } | S::SubgroupGather { .. } => {
                    if flow && record {
                        self.violations.push(format!("{}: {:?} in varying control flow", self.fun.name.as_deref().unwrap_or("?"), std::mem::discriminant(s)).replace("Discriminant", "statement "));
                    }
                    Exit::default()
                }
                S::Store { pointer, value } => {
                    if let Some((l, varying_index)) = self.local_root(*pointer) {
                        if flow || varying_index || self.varying[value.index()] {
                            self.varying_locals.insert(l);
                        }
                    }
                    Exit::default()
                }
                S::Call { function, arguments, .. } => {
                    let callee = &self.module.functions[*function];
                    if synchronises(self.module, callee) {
                        if flow && record {
                            self.violations.push(format!(
                                "{}: call to {} (which synchronises) in varying control flow",
                                self.fun.name.as_deref().unwrap_or("?"),
                                callee.name.as_deref().unwrap_or("?")
                            ));
                        }
                        if record {
                            let args = arguments.iter().map(|a| self.varying[a.index()]).collect();
                            let mut inner = Analysis::new(self.module, callee, args);
                            self.violations.extend(inner.run());
                        }
                    }
                    Exit::default()
                }
                _ => Exit::default(),
            };
            exit.ret |= e.ret;
            exit.brk |= e.brk;
            // Past a return or break taken by some invocations only, the rest
            // of this block runs in varying flow.
            if e.ret || e.brk {
                flow = true;
            }
        }
        exit
    }

    /// A boolean known at pipeline creation (once overrides are resolved).
    fn constant_bool(&self, e: Handle<naga::Expression>) -> Option<bool> {
        const_bool(self.module, self.fun, &self.constant_locals, e)
    }

    /// The variation of every expression and local: locals become varying as
    /// stores are found, so the walk repeats until nothing changes.
    fn settle(&mut self) {
        loop {
            let before = self.varying_locals.len();
            self.expressions();
            self.block(&self.fun.body, false, false);
            if self.varying_locals.len() == before {
                break;
            }
        }
        self.expressions();
    }

    /// Whether the function's result varies (no violations recorded).
    fn run_quiet(&mut self) -> bool {
        self.settle();
        self.returns_varying = false;
        self.block(&self.fun.body, false, false);
        self.returns_varying
    }

    fn run(&mut self) -> Vec<String> {
        self.settle();
        self.block(&self.fun.body, false, true);
        std::mem::take(&mut self.violations)
    }
}

fn collect_calls(b: &Block, out: &mut Vec<(Handle<naga::Expression>, Handle<Function>, Vec<Handle<naga::Expression>>)>) {
    for s in b.iter() {
        match s {
            S::Call { result: Some(r), function, arguments } => out.push((*r, *function, arguments.clone())),
            S::Block(x) => collect_calls(x, out),
            S::If { accept, reject, .. } => {
                collect_calls(accept, out);
                collect_calls(reject, out);
            }
            S::Switch { cases, .. } => cases.iter().for_each(|c| collect_calls(&c.body, out)),
            S::Loop { body, continuing, .. } => {
                collect_calls(body, out);
                collect_calls(continuing, out);
            }
            _ => {}
        }
    }
}

/// Entry-point arguments: workgroup-level built-ins are uniform, the rest vary.
fn entry_args(f: &Function) -> Vec<bool> {
    f.arguments.iter().map(|a| !matches!(a.binding, Some(naga::Binding::BuiltIn(BuiltIn::WorkGroupId | BuiltIn::WorkGroupSize | BuiltIn::NumWorkGroups | BuiltIn::NumSubgroups)))).collect()
}

/// Violations in every entry point of `src`, its override constants resolved
/// at `consts` (the rest at their defaults), so branches on them are decided.
fn violations_with(src: &str, consts: &[(&str, f64)]) -> Vec<String> {
    let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module).expect("validates");
    let mut out = vec![];
    for ep in &module.entry_points {
        // Only the constants this module declares.
        let pc: naga::back::PipelineConstants = consts.iter().filter(|(k, _)| module.overrides.iter().any(|(_, o)| o.name.as_deref() == Some(*k))).map(|(k, v)| (k.to_string(), *v)).collect();
        let (m, _) = naga::back::pipeline_constants::process_overrides(&module, &info, Some((ep.stage, &ep.name)), &pc).unwrap_or_else(|e| panic!("{}: {e:?}", ep.name));
        let e = m.entry_points.iter().find(|x| x.name == ep.name).unwrap();
        let mut a = Analysis::new(&m, &e.function, entry_args(&e.function));
        out.extend(a.run().into_iter().map(|v| format!("{}: {v}", ep.name)));
    }
    out
}

fn violations(src: &str) -> Vec<String> {
    violations_with(src, &[])
}

/// The override values the engine dispatches with that change control flow:
/// workgroup sizes (a one-lane workgroup compiles no barrier), the CPU drivers'
/// lane-per-channel BatchNorm, split-K, subgroup sharing of A.
fn override_sets(shader: &str) -> Vec<Vec<(&'static str, f64)>> {
    let mut v = vec![vec![]];
    match shader {
        "matmul" => {
            v.push(vec![("SPLIT", 1.0)]);
            v.push(vec![("A_SHARE", 1.0), ("TRM", 16.0)]);
            v.push(vec![("A_MODE", 1.0)]);
            v.push(vec![("A_MODE", 2.0), ("B_MODE", 1.0)]);
        }
        "dwconv" => {
            v.push(vec![("WG", 1.0)]);
            v.push(vec![("CPL", 1.0), ("WG", 16.0)]);
            v.push(vec![("BN_EVAL", 1.0)]);
        }
        "rownorm" => {
            v.push(vec![("LANES", 1.0), ("WG", 16.0)]);
            v.push(vec![("LANES", 64.0), ("WG", 64.0)]);
            v.push(vec![("LANES", 64.0), ("WG", 64.0), ("SG_REDUCE", 1.0)]);
        }
        "attention" => {
            v.push(vec![("WG", 8.0), ("QPI", 4.0)]);
            v.push(vec![("SAVE_P", 1.0)]);
        }
        _ => {}
    }
    v
}

#[test]
fn synchronisation_is_in_uniform_control_flow_in_every_kernel() {
    let mut found = vec![];
    for (name, body) in SHADERS {
        for (read, sg) in [(TexRead::Sampled, false), (TexRead::Storage, true)] {
            let src = prelude(read, false, false, sg) + &cvt_gpu::gpu::derive_entries(body);
            for consts in override_sets(name) {
                found.extend(violations_with(&src, &consts).into_iter().map(|v| format!("{name}.wgsl ({} reads, subgroups {sg}, {consts:?}): {v}", read.name())));
            }
        }
    }
    found.dedup();
    // Reviewed exceptions. The CPU set's texture GEMM with A_SHARE broadcasts A
    // across a subgroup after lanes past the output's last rows have returned:
    // the host sets A_SHARE only where every lane of a subgroup has the same rows
    // (`ops::matmul::tex_block`: all 16 lanes along columns, or 8 where the probe
    // found the subgroups to be those runs of 8), so the flow is uniform within
    // each subgroup, which is what subgroup operations need; workgroup-wide it is
    // not, which this analysis cannot see. No barrier is exempt.
    let reviewed = |v: &String| v.starts_with("matmul.wgsl") && v.contains("(\"A_SHARE\", 1.0)") && (v.contains("main_tex: call to bc") || v.contains("main_tex_act: call to bc"));
    found.retain(|v| !reviewed(v));
    assert!(found.is_empty(), "synchronisation in varying control flow:\n{}", found.join("\n"));
}

/// The analysis finds what it must: a barrier after a varying early return, in a
/// branch on the invocation index, in a loop with a varying trip count, and after
/// a local written from a varying value; and accepts the uniform forms.
#[test]
fn the_uniformity_check_catches_varying_flow() {
    let kernel = |body: &str| {
        format!(
            "@group(0) @binding(0) var<uniform> n: u32;\n@group(0) @binding(1) var<storage, read_write> x: array<f32>;\nvar<workgroup> t: array<f32, 64>;\n\
             @compute @workgroup_size(64) fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {{\n{body}\n}}\n"
        )
    };
    for bad in [
        "if (lid >= n) { return; }\n workgroupBarrier();",
        "if (lid == 0u) { workgroupBarrier(); }",
        "for (var i = lid; i < n; i++) { workgroupBarrier(); }",
        "var k = 0u; if (lid > 3u) { k = 1u; } if (k == 0u) { workgroupBarrier(); }",
        "var k = lid; loop { if (k >= n) { break; } workgroupBarrier(); k += 64u; }",
        "if (x[lid] > 0.0) { storageBarrier(); }",
    ] {
        assert!(!violations(&kernel(bad)).is_empty(), "not caught: {bad}");
    }
    for good in [
        "if (wid.x >= n) { return; }\n workgroupBarrier();",
        "for (var i = 0u; i < n; i++) { t[lid] = f32(i); workgroupBarrier(); }",
        "var s = 0u; if (n > 2u) { s = n; } for (var i = 0u; i < s; i++) { workgroupBarrier(); }",
        "workgroupBarrier(); if (lid == 0u) { x[0] = t[0]; }",
    ] {
        let v = violations(&kernel(good));
        assert!(v.is_empty(), "uniform flow reported: {good}: {v:?}");
    }
}
