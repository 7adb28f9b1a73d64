//! An augmented interval tree (`lib/interval_tree.c`, `include/linux/interval_tree_generic.h`).
//!
//! Half-open intervals `[start, end)`, each under a unique key `(start, id)`, kept in a
//! balanced search tree ordered by key in which every node also holds the largest `end`
//! of its subtree (the kernel's `__subtree_last`). A stabbing query `[s, e)` then skips
//! every subtree whose largest end is at or below `s`, and every right subtree of a node
//! that starts at or after `e`, so it costs `O(log n + k)` for `k` results however the
//! lengths are mixed: one interval over the whole address space does not make a lookup
//! scan the small ones, as a sorted map searched from `s - longest` would.
//!
//! The tree is a treap (balanced by pseudo-random priorities, expected depth `O(log n)`)
//! in an arena of nodes linked by index, where the kernel's is an augmented red-black tree
//! of embedded nodes; the queries and their costs are the same. Results come in key
//! order, so a query's order is deterministic.
//!
//! Invariants: (1) in-order traversal is in strictly increasing key order; (2) a parent's
//! priority is at least its children's; (3) every node's `max_end` is the largest `end`
//! in its subtree; (4) freed slots hold no value and are on the free list. The tests
//! check all four against a brute-force model after random operations.

/// No node.
const NIL: u32 = u32::MAX;

struct Node<T> {
    start: u64,
    end: u64,
    id: u64,
    prio: u64,
    /// The largest `end` in this subtree.
    max_end: u64,
    left: u32,
    right: u32,
    /// `None` only while the slot is free.
    value: Option<T>,
}

impl<T> Node<T> {
    fn key(&self) -> (u64, u64) {
        (self.start, self.id)
    }
}

/// Intervals `[start, end)` with values, looked up by overlap.
pub(crate) struct IntervalTree<T> {
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    root: u32,
    len: usize,
    /// State of the priority generator (splitmix64: deterministic, well spread).
    prio_state: u64,
}

impl<T> Default for IntervalTree<T> {
    fn default() -> Self {
        IntervalTree {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            len: 0,
            prio_state: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl<T> IntervalTree<T> {
    /// Number of intervals.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Inserts `[start, end)` under the key `(start, id)`, which must not be present.
    ///
    /// # Panics
    ///
    /// If the tree would hold `u32::MAX` nodes.
    pub(crate) fn insert(&mut self, start: u64, end: u64, id: u64, value: T) {
        debug_assert!(!self.contains_key(start, id), "keys are unique");
        let prio = self.next_prio();
        let node = Node {
            start,
            end,
            id,
            prio,
            max_end: end,
            left: NIL,
            right: NIL,
            value: Some(value),
        };
        let at = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                let i = u32::try_from(self.nodes.len())
                    .ok()
                    .filter(|&i| i != NIL)
                    .expect("an interval tree holds fewer than 2^32 - 1 nodes");
                self.nodes.push(node);
                i
            }
        };
        let (l, r) = self.split(self.root, (start, id));
        let l = self.merge(l, at);
        self.root = self.merge(l, r);
        self.len += 1;
    }

    /// Removes the interval under `(start, id)` and returns its value.
    pub(crate) fn remove(&mut self, start: u64, id: u64) -> Option<T> {
        let (root, value) = self.remove_in(self.root, (start, id));
        self.root = root;
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    /// Whether `(start, id)` is present.
    pub(crate) fn contains_key(&self, start: u64, id: u64) -> bool {
        let key = (start, id);
        let mut t = self.root;
        while t != NIL {
            let n = &self.nodes[t as usize];
            match key.cmp(&n.key()) {
                std::cmp::Ordering::Less => t = n.left,
                std::cmp::Ordering::Greater => t = n.right,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }

    /// Calls `f` on the value of every interval overlapping `[s, e)`, in key order
    /// (`interval_tree_iter_first` and `_next`).
    pub(crate) fn for_each_overlapping(&self, s: u64, e: u64, mut f: impl FnMut(&T)) {
        if s < e {
            self.visit(self.root, s, e, &mut f);
        }
    }

    fn visit(&self, t: u32, s: u64, e: u64, f: &mut impl FnMut(&T)) {
        if t == NIL {
            return;
        }
        let n = &self.nodes[t as usize];
        if n.max_end <= s {
            return; // everything here ends before the query starts
        }
        self.visit(n.left, s, e, f);
        if n.start >= e {
            return; // this node and its right subtree start after the query ends
        }
        if n.end > s {
            f(n.value.as_ref().expect("a linked node holds its value"));
        }
        self.visit(n.right, s, e, f);
    }

    fn next_prio(&mut self) -> u64 {
        self.prio_state = self.prio_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.prio_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn max_end_of(&self, t: u32) -> u64 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].max_end
        }
    }

    /// Recomputes `t`'s `max_end` from its own end and its children's.
    fn update(&mut self, t: u32) {
        let (l, r) = {
            let n = &self.nodes[t as usize];
            (n.left, n.right)
        };
        let m = self.max_end_of(l).max(self.max_end_of(r));
        let n = &mut self.nodes[t as usize];
        n.max_end = n.end.max(m);
    }

    /// Splits `t` into the keys below `key` and the rest.
    fn split(&mut self, t: u32, key: (u64, u64)) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.nodes[t as usize].key() < key {
            let (a, b) = self.split(self.nodes[t as usize].right, key);
            self.nodes[t as usize].right = a;
            self.update(t);
            (t, b)
        } else {
            let (a, b) = self.split(self.nodes[t as usize].left, key);
            self.nodes[t as usize].left = b;
            self.update(t);
            (a, t)
        }
    }

    /// Joins `a` and `b`, every key of `a` below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio >= self.nodes[b as usize].prio {
            let r = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = r;
            self.update(a);
            a
        } else {
            let l = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = l;
            self.update(b);
            b
        }
    }

    /// Removes `key` from the subtree `t`; returns the new subtree and the value.
    fn remove_in(&mut self, t: u32, key: (u64, u64)) -> (u32, Option<T>) {
        if t == NIL {
            return (NIL, None);
        }
        let (left, right) = {
            let n = &self.nodes[t as usize];
            (n.left, n.right)
        };
        match key.cmp(&self.nodes[t as usize].key()) {
            std::cmp::Ordering::Less => {
                let (l, v) = self.remove_in(left, key);
                self.nodes[t as usize].left = l;
                self.update(t);
                (t, v)
            }
            std::cmp::Ordering::Greater => {
                let (r, v) = self.remove_in(right, key);
                self.nodes[t as usize].right = r;
                self.update(t);
                (t, v)
            }
            std::cmp::Ordering::Equal => {
                let joined = self.merge(left, right);
                let n = &mut self.nodes[t as usize];
                n.left = NIL;
                n.right = NIL;
                let v = n.value.take();
                self.free.push(t);
                (joined, v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    impl<T> IntervalTree<T> {
        /// Checks invariants 1 to 4; returns the keys in order.
        fn check(&self) -> Vec<(u64, u64)> {
            fn walk<T>(tree: &IntervalTree<T>, t: u32, keys: &mut Vec<(u64, u64)>) -> u64 {
                if t == NIL {
                    return 0;
                }
                let n = &tree.nodes[t as usize];
                assert!(n.value.is_some(), "a linked node holds a value");
                for c in [n.left, n.right] {
                    if c != NIL {
                        assert!(tree.nodes[c as usize].prio <= n.prio, "heap order");
                    }
                }
                let l = walk(tree, n.left, keys);
                keys.push(n.key());
                let r = walk(tree, n.right, keys);
                let m = n.end.max(l).max(r);
                assert_eq!(n.max_end, m, "max_end is the subtree's largest end");
                m
            }
            let mut keys = Vec::new();
            walk(self, self.root, &mut keys);
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "key order");
            assert_eq!(keys.len(), self.len);
            for &f in &self.free {
                assert!(
                    self.nodes[f as usize].value.is_none(),
                    "free slots are empty"
                );
            }
            assert_eq!(self.nodes.len(), self.len + self.free.len());
            keys
        }
    }

    fn overlapping(tree: &IntervalTree<u64>, s: u64, e: u64) -> Vec<u64> {
        let mut out = Vec::new();
        tree.for_each_overlapping(s, e, |v| out.push(*v));
        out
    }

    #[test]
    fn a_long_interval_among_short_ones_is_found_without_hiding_them() {
        let mut t = IntervalTree::default();
        for i in 0..1000u64 {
            t.insert(i * 100, i * 100 + 10, i, i);
        }
        t.insert(0, u64::MAX, 5000, 5000);
        assert_eq!(overlapping(&t, 505, 515), vec![5000, 5]);
        assert_eq!(overlapping(&t, 510, 600), vec![5000]);
        assert_eq!(overlapping(&t, 500, 500), Vec::<u64>::new());
        assert_eq!(t.remove(0, 5000), Some(5000));
        assert_eq!(t.remove(0, 5000), None);
        assert_eq!(overlapping(&t, 0, 201), vec![0, 1, 2]);
        t.check();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(usize),
        Query(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..1000, 1u64..300).prop_map(|(s, l)| Op::Insert(s, l)),
            2 => any::<usize>().prop_map(Op::Remove),
            2 => (0u64..1300, 1u64..400).prop_map(|(s, l)| Op::Query(s, l)),
        ]
    }

    proptest! {
        /// Every operation agrees with a brute-force list of intervals, and the
        /// invariants hold after each.
        #[test]
        fn agrees_with_a_list(ops in proptest::collection::vec(op(), 1..300)) {
            let mut tree = IntervalTree::default();
            let mut model: Vec<(u64, u64, u64)> = Vec::new(); // (start, id, end)
            let mut next_id = 0u64;
            for op in ops {
                match op {
                    Op::Insert(s, l) => {
                        tree.insert(s, s + l, next_id, next_id);
                        model.push((s, next_id, s + l));
                        next_id += 1;
                    }
                    Op::Remove(i) if !model.is_empty() => {
                        let (s, id, _) = model.swap_remove(i % model.len());
                        prop_assert_eq!(tree.remove(s, id), Some(id));
                        prop_assert!(!tree.contains_key(s, id));
                    }
                    Op::Remove(_) => prop_assert_eq!(tree.remove(7, 7), None),
                    Op::Query(s, l) => {
                        let mut want: Vec<(u64, u64)> = model
                            .iter()
                            .filter(|&&(a, _, b)| a < s + l && b > s)
                            .map(|&(a, id, _)| (a, id))
                            .collect();
                        want.sort_unstable();
                        let ids: Vec<u64> = want.iter().map(|&(_, id)| id).collect();
                        prop_assert_eq!(overlapping(&tree, s, s + l), ids);
                    }
                }
                let mut keys: Vec<(u64, u64)> = model.iter().map(|&(s, id, _)| (s, id)).collect();
                keys.sort_unstable();
                prop_assert_eq!(tree.check(), keys);
            }
        }
    }
}
