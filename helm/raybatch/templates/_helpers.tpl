{{/*
Shared pieces. Kept to .Values lookups, if/with/range, include, toYaml, nindent,
quote, default and required, so tests/unit/test_helm_chart.py can render the chart
without helm.
*/}}

{{/* The RayService's name; KubeRay prefixes its Services and pods with it. */}}
{{- define "raybatch.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride -}}
{{- end -}}

{{- define "raybatch.labels" -}}
app.kubernetes.io/name: raybatch
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The storage root every pod reads and writes. */}}
{{- define "raybatch.storageUrl" -}}
{{- if eq .Values.storage.type "s3" -}}
{{- required "storage.s3.url is required" .Values.storage.s3.url -}}
{{- else if eq .Values.storage.type "pvc" -}}
{{- .Values.storage.pvc.mountPath }}/storage
{{- else -}}
{{- fail "storage.type must be s3 or pvc" -}}
{{- end -}}
{{- end -}}

{{/*
The Serve config: the same document as raybatch/deploy/serve.yaml with these values
(tests/unit/test_deploy_configs.py holds them equal for the defaults).
*/}}
{{- define "raybatch.serveConfig" -}}
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: raybatch
    route_prefix: /
    import_path: raybatch.api.app:build_app
    args:
      storage: {{ include "raybatch.storageUrl" . }}
      {{- toYaml .Values.serviceConfig | nindent 6 }}
      models:
        {{- toYaml .Values.models | nindent 8 }}
{{- end -}}

{{/* Environment of every Ray container: storage credentials, HF_TOKEN, extra env. */}}
{{- define "raybatch.env" -}}
envFrom:
  {{- if and (eq .Values.storage.type "s3") .Values.storage.s3.credentialsSecret }}
  # AWS_* for the API, the scheduler, job drivers and Ray Data tasks.
  - secretRef:
      name: {{ .Values.storage.s3.credentialsSecret }}
  {{- end }}
  {{- with .Values.huggingFaceSecret }}
  # HF_TOKEN for gated models; optional.
  - secretRef:
      name: {{ . }}
      optional: true
  {{- end }}
{{- with .Values.common.env }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the head and every worker group. */}}
{{- define "raybatch.podSpec" -}}
securityContext:
  {{- toYaml .Values.common.podSecurityContext | nindent 2 }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
One GPU worker group. Called with (dict "root" $ "group" <values of the group>) for
`worker` and for each enabled additionalWorkerGroups entry.
*/}}
{{- define "raybatch.workerGroup" -}}
{{- $root := .root -}}
{{- $group := .group -}}
- groupName: {{ $group.groupName }}
  # Pods at start; min/max bound the autoscaler (autoscaling.enabled), else equal.
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  # Empty: KubeRay derives num-cpus, num-gpus and memory from the limits, and Ray
  # detects the GPU model itself (accelerator_type:<GPU>).
  rayStartParams:
    {{- toYaml $group.rayStartParams | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "raybatch.labels" $root | nindent 8 }}
        {{- with $group.labels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $group.annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "raybatch.podSpec" $root | nindent 6 }}
      containers:
        - name: ray-worker
          image: {{ $root.Values.image.repository }}:{{ $root.Values.image.tag }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          {{- include "raybatch.env" $root | nindent 10 }}
          securityContext:
            {{- toYaml $root.Values.common.securityContext | nindent 12 }}
          resources:
            # A replica's GPUs are all in one pod: tensor_parallel_size <= gpus.
            limits:
              nvidia.com/gpu: {{ $group.gpus }}
              {{- toYaml $group.resources.limits | nindent 14 }}
            requests:
              nvidia.com/gpu: {{ $group.gpus }}
              {{- toYaml $group.resources.requests | nindent 14 }}
          ports:
            - containerPort: 8080    # Ray's and raybatch's metrics (Prometheus)
              name: metrics
          volumeMounts:
            # vLLM's tensor-parallel workers talk through shared memory.
            - mountPath: /dev/shm
              name: dshm
            {{- if eq $root.Values.storage.type "pvc" }}
            - mountPath: {{ $root.Values.storage.pvc.mountPath }}
              name: storage
            {{- end }}
      volumes:
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $group.shmSize }}
        {{- if eq $root.Values.storage.type "pvc" }}
        - name: storage
          persistentVolumeClaim:
            claimName: {{ required "storage.pvc.claimName is required" $root.Values.storage.pvc.claimName }}
        {{- end }}
      {{- with $group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
