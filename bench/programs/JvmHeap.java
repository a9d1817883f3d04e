/* An ordinary JVM workload for bench/bench_shapes.py and the tests: a heap
 * of MIB MiB (nothing in it knows about umgr), in phases:
 *
 *   fill     MIB MiB of long[4096] arrays (32 KiB each), every word set to
 *            expect(array, word, version 0)
 *   map      a HashMap of 3000 entries per MiB (Long -> Long: ~80 bytes of
 *            small objects an entry, a quarter of the arrays' size, placed
 *            in insertion order), filled, then walked in the table's order
 *            (random pages), every value checked
 *   update   ROUNDS times as many random arrays as there are: a few words
 *            checked, then every word moved to the next version; every
 *            64th array is copied (the old one becomes garbage) and small
 *            garbage is made all along, so the collector runs and moves
 *            objects while pages are out
 *   verify   every word of every array, and every map entry looked up by
 *            its key in insertion order (the keys drawn again)
 *
 *     java -XX:+UseSerialGC -cp DIR JvmHeap [MIB [ROUNDS [SEED]]]
 *
 * Prints one JSON line: {"ok":true,"phases":{...},"minflt":{...},
 * "majflt":{...},"peak_rss_kb":...,"gc":"..."} (minflt and majflt from
 * /proc/self/stat, per phase, as bench/programs/shapes.c gives them; under
 * umgr a userfault counts as a minor fault). A wrong word: a message on
 * stderr and exit 1.
 */
import java.io.IOException;
import java.lang.management.GarbageCollectorMXBean;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.SplittableRandom;

public class JvmHeap {
    static final int WORDS = 4096;

    static long expect(int array, int word, int version) {
        return array * 1000003L + word + ((long) version << 40);
    }

    static long mapValue(long key) {
        return key * 0x9E3779B97F4A7C15L ^ (key >>> 7);
    }

    static void fail(String what) {
        System.err.println("JvmHeap: " + what);
        System.exit(1);
    }

    /* minflt and majflt: fields 10 and 12 of /proc/self/stat (after the
     * command name, which may hold spaces but ends at the last ')'). */
    static long[] faults() throws IOException {
        String stat = new String(Files.readAllBytes(Paths.get("/proc/self/stat")));
        String[] f = stat.substring(stat.lastIndexOf(')') + 2).split(" ");
        return new long[] {Long.parseLong(f[7]), Long.parseLong(f[9])};
    }

    static long peakRssKb() throws IOException {
        for (String line : Files.readAllLines(Paths.get("/proc/self/status")))
            if (line.startsWith("VmHWM:"))
                return Long.parseLong(line.replaceAll("[^0-9]", ""));
        return 0;
    }

    static final Map<String, Double> seconds = new LinkedHashMap<>();
    static final Map<String, Long> minflt = new LinkedHashMap<>(), majflt = new LinkedHashMap<>();
    static long started;
    static long[] startFaults;

    static void begin() throws IOException {
        startFaults = faults();
        started = System.nanoTime();
    }

    static void end(String phase) throws IOException {
        seconds.put(phase, (System.nanoTime() - started) / 1e9);
        long[] now = faults();
        minflt.put(phase, now[0] - startFaults[0]);
        majflt.put(phase, now[1] - startFaults[1]);
    }

    static String json(Map<String, ?> m) {
        StringBuilder s = new StringBuilder("{");
        for (Map.Entry<String, ?> e : m.entrySet())
            s.append(s.length() > 1 ? "," : "").append('"').append(e.getKey()).append("\":").append(e.getValue());
        return s.append('}').toString();
    }

    public static void main(String[] args) throws IOException {
        int mib = args.length > 0 ? Integer.parseInt(args[0]) : 256;
        int rounds = args.length > 1 ? Integer.parseInt(args[1]) : 2;
        long seed = args.length > 2 ? Long.parseLong(args[2]) : 1;
        int n = (int) ((long) mib * 1024 * 1024 / (WORDS * 8));

        begin();
        long[][] arrays = new long[n][];
        int[] version = new int[n];
        for (int i = 0; i < n; i++) {
            long[] a = new long[WORDS];
            for (int w = 0; w < WORDS; w++)
                a[w] = expect(i, w, 0);
            arrays[i] = a;
        }
        end("fill");

        begin();
        int entries = mib * 3000;
        HashMap<Long, Long> map = new HashMap<>();
        SplittableRandom keys = new SplittableRandom(seed);
        for (int e = 0; e < entries; e++) {
            long key = keys.nextLong();
            map.put(key, mapValue(key));
        }
        for (Map.Entry<Long, Long> e : map.entrySet())   // in the table's order: scattered keys
            if (e.getValue() != mapValue(e.getKey()))
                fail("map entry " + e.getKey() + " holds " + e.getValue());
        end("map");

        begin();
        SplittableRandom random = new SplittableRandom(seed + 1);
        List<long[]> garbage = new ArrayList<>();
        for (long t = 0; t < (long) rounds * n; t++) {
            int i = random.nextInt(n);
            long[] a = arrays[i];
            for (int w = 0; w < WORDS; w += 509)
                if (a[w] != expect(i, w, version[i]))
                    fail("array " + i + " word " + w + " holds " + Long.toHexString(a[w]) + ", not "
                         + Long.toHexString(expect(i, w, version[i])));
            version[i]++;
            for (int w = 0; w < WORDS; w++)
                a[w] += 1L << 40;
            if (t % 64 == 0)
                arrays[i] = Arrays.copyOf(a, WORDS);
            if (t % 8 == 0) {
                garbage.add(new long[2048]);
                if (garbage.size() > n / 8)
                    garbage.clear();
            }
        }
        end("update");

        begin();
        for (int i = 0; i < n; i++)
            for (int w = 0; w < WORDS; w++)
                if (arrays[i][w] != expect(i, w, version[i]))
                    fail("array " + i + " word " + w + " holds " + Long.toHexString(arrays[i][w]) + ", not "
                         + Long.toHexString(expect(i, w, version[i])));
        keys = new SplittableRandom(seed);
        for (int e = 0; e < entries; e++) {
            long key = keys.nextLong();
            Long value = map.get(key);
            if (value == null || value != mapValue(key))
                fail("map entry " + key + " holds " + value);
        }
        if (map.size() != entries)   // 64-bit random keys: no two alike
            fail("map holds " + map.size() + " entries of " + entries);
        end("verify");

        String gc = "";
        for (GarbageCollectorMXBean bean : ManagementFactory.getGarbageCollectorMXBeans())
            gc += (gc.isEmpty() ? "" : ",") + bean.getName();
        System.out.println("{\"ok\":true,\"arrays\":" + n + ",\"map_entries\":" + map.size() + ",\"phases\":"
                           + json(seconds) + ",\"minflt\":" + json(minflt) + ",\"majflt\":" + json(majflt)
                           + ",\"peak_rss_kb\":" + peakRssKb() + ",\"gc\":\"" + gc + "\"}");
    }
}
